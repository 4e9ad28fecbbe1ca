"""pass@k (against brute-force enumeration) and `lit-sapo eval` on tiny-random-llama with the shipped benchmarks."""

from __future__ import annotations

import itertools
import json

import pytest

from lit_sapo import evaluate, models
from lit_sapo.callbacks.evaluation import pass_at_k, pass_ks

ROW_KEYS = {"step", "index", "id", "problem", "gold", "completions", "extracted", "majority", "correct",
            "majority_correct"}  # BenchmarkEvaluation's per-problem rows


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(samples, k), abs=1e-12), (n, c, k)
    assert pass_at_k(4, 1, 2) == 0.5 and pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    assert pass_ks(1) == [1] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6]


def test_protocol_presets_and_explicit_flags():
    parse = lambda *a: evaluate.resolve_settings(evaluate.build_parser().parse_args(["--model", "m", "--out", "o", *a]))  # noqa: E731
    r1 = parse()
    assert (r1["temperature"], r1["top_p"], r1["n"], r1["system_prompt"]) == (0.6, 0.95, 4, None)
    qwen = parse("--protocol", "qwen-math")
    assert (qwen["temperature"], qwen["n"], qwen["instruction"]) == (0.0, 1, "")
    assert qwen["system_prompt"] == "Please reason step by step, and put your final answer within \\boxed{}."
    assert parse("--greedy")["temperature"] == 0.0 and parse("--greedy")["n"] == 1
    assert parse("--temperature", "1.0", "--n", "8")["n"] == 8


@pytest.mark.parametrize("args, expected", [
    (["--model", "nope"], "--model"),
    (["--benchmarks", "gsm8k,bogus"], "--benchmarks: 'bogus'"),
    (["--n", "0"], "--n"),
    (["--top_p", "1.5"], "--top_p"),
    (["--greedy", "--temperature", "0.7"], "--greedy"),
    (["--model", "missing.ckpt"], "checkpoint missing.ckpt"),
])
def test_bad_input_is_one_line_before_the_model_loads(args, expected, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: loaded.append(a))
    argv = ["--model", "tiny-random-llama", "--out", str(tmp_path), *args]
    assert evaluate.main(argv) == 2 and not loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-sapo eval: error: ") and expected in err[0]


def test_eval_tiny_model_writes_summary_rows_and_consistent_pass_at_k(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", "tiny-random-llama", "--benchmarks", "gsm8k,aime24", "--n", "3", "--limit", "3",
            "--max_new_tokens", "8", "--grading_workers", "0", "--out", str(out)]
    assert evaluate.main(argv) == 0
    table = capsys.readouterr().out
    assert "benchmark" in table and "pass@2" in table and "gsm8k" in table and "aime24" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny-random-llama"
    assert summary["settings"]["n"] == 3
    assert (summary["settings"]["temperature"], summary["settings"]["top_p"]) == (0.6, 0.95)
    expected_ids = {"gsm8k": ["gsm8k-test-0000", "gsm8k-test-0001", "gsm8k-test-0002"],
                    "aime24": ["aime2024-I-1", "aime2024-I-2", "aime2024-I-3"]}
    for name, ids in expected_ids.items():
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ids and all(set(r) == ROW_KEYS for r in rows)
        assert all(len(r["completions"]) == len(r["correct"]) == len(r["extracted"]) == 3 for r in rows)
        metrics = summary["benchmarks"][name]
        assert set(metrics) == {"pass@1", "pass@2", "pass@3", "avg@3", "maj@3", "problems", "time_s"}
        assert metrics["problems"] == 3
        for k in (1, 2, 3):  # the summary's pass@k is the mean of the per-problem estimates of the JSONL rows
            per_problem = [pass_at_k(3, int(sum(r["correct"])), k) for r in rows]
            assert metrics[f"pass@{k}"] == pytest.approx(sum(per_problem) / 3)
        assert metrics["maj@3"] == pytest.approx(sum(r["majority_correct"] for r in rows) / 3)
        assert metrics["avg@3"] == pytest.approx(sum(sum(r["correct"]) / 3 for r in rows) / 3)
