"""Evaluation sets shipped with the package (GSM8K test, MATH500, AIME 2024) for offline benchmark runs.

Each file is normalized JSONL, one problem a line: ``{"id", "problem", "answer", "source"}`` (``source`` names
where the row came from). Their origins and licences: ``data/NOTICE.md`` beside them.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500.jsonl", "aime24": "aime24.jsonl"}
SIZES = {"gsm8k": 1319, "math500": 500, "aime24": 30}


def names() -> list[str]:
    """The benchmarks shipped with the package."""
    return list(FILES)


def path(name: str) -> Path:
    """The shipped JSONL file of benchmark `name` (gsm8k = its test split)."""
    if name not in FILES:
        raise ValueError(f"no shipped benchmark {name!r}; shipped: {', '.join(FILES)}")
    return DATA_DIR / FILES[name]
