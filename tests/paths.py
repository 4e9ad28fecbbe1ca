"""Where the tests find the real benchmark data (GSM8K, MATH500, AIME24 as normalized JSONL).

CI clones the repository with `shared/` beside it; `$LIT_SAPO_SHARED_DATA` overrides.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = [os.environ.get("LIT_SAPO_SHARED_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"]
SHARED_DATA = next((Path(p) for p in _CANDIDATES if p and Path(p).is_dir()), ROOT.parent / "shared" / "data")
GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
