"""lit_sapo.callbacks: hand-computed monitor values, a real run from YAML (with a user callback), 2 ranks = 1 rank,
and BenchmarkEvaluation with SmolLM2 (slow)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_sapo.callbacks import BenchmarkEvaluation, EntropyMonitor, ImportanceRatioMonitor
from lit_sapo.callbacks.evaluation import majority_answer, summarize
from lit_sapo.module import UpdateRecord
from lit_sapo.objective import GateTerms

REPO = Path(__file__).resolve().parents[1]
PAD = 99.0  # junk at padded positions: any leak into a statistic shows


def record(epoch, mb, r, adv, valid, df=None, entropy=None) -> UpdateRecord:
    """An UpdateRecord of len(r) rows padded to width 3; `valid` = number of valid tokens per row."""
    rows = len(r)
    mask = torch.tensor([[j < v for j in range(3)] for v in valid])
    def pad(x):
        return torch.tensor([row + [PAD] * (3 - len(row)) for row in x], dtype=torch.float32)
    ratio = pad(r)
    adv_t = torch.tensor(adv, dtype=torch.float32)[:, None].expand(rows, 3) * mask
    terms = GateTerms(log_ratio=ratio.log(), ratio=ratio, gate_value=ratio, gate_grad=pad(df or r),
                      tau=torch.ones(rows, 3), advantages=adv_t, mask=mask)
    return UpdateRecord(epoch, mb, torch.arange(rows), terms, None if entropy is None else pad(entropy))


def run_hook(callback, updates):
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda d, **kw: logged.update(d))
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], global_step=0)
    callback.on_train_batch_end(trainer, module, {"updates": updates}, SimpleNamespace(rollout_index=0), 0)
    return logged


def test_entropy_monitor_token_weighted_first_epoch_only():
    updates = [  # micro-batch 1: tokens 1, 2 (A > 0) and 3 (A < 0); micro-batch 2: token 10 (A > 0)
        record(0, 0, [[1, 1], [1]], [1.0, -1.0], [2, 1], entropy=[[1, 2], [3]]),
        record(0, 1, [[1]], [2.0], [1], entropy=[[10]]),
        record(1, 0, [[1, 1, 1]], [1.0], [3], entropy=[[100, 100, 100]]),  # epoch 1: each token counted once
    ]
    got = run_hook(EntropyMonitor(), updates)
    # token-weighted: (1+2+3+10)/4 = 4, not the mean of micro-batch means (2+10)/2 = 6
    expect = {"entropy/mean": 4.0, "entropy/mean_pos": 13 / 3, "entropy/mean_neg": 3.0,
              "entropy/p10": 1.3, "entropy/p50": 2.5, "entropy/p90": 7.9,  # linear interpolation on [1, 2, 3, 10]
              "entropy/p10_pos": 1.2, "entropy/p50_pos": 2.0, "entropy/p90_pos": 8.4,
              "entropy/p10_neg": 3.0, "entropy/p50_neg": 3.0, "entropy/p90_neg": 3.0}
    assert got == pytest.approx(expect)
    q = torch.quantile(torch.tensor([1.0, 2, 3, 10]), torch.tensor([0.1, 0.5, 0.9]))
    assert [got["entropy/p10"], got["entropy/p50"], got["entropy/p90"]] == pytest.approx(q.tolist())


def test_importance_ratio_monitor_hand_values_and_histograms():
    updates = [  # update 0 = two micro-batches of 2 and 1 tokens; update 1 = one token
        record(0, 0, [[2, 4]], [1.0], [2], df=[[0.2, 0.9]]),
        record(0, 0, [[1]], [-1.0], [1], df=[[1.0]]),
        record(0, 1, [[0.5]], [-1.0], [1], df=[[0.4]]),
    ]
    hist = []
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda d, **kw: logged.update(d))
    writer = SimpleNamespace(add_histogram=lambda tag, values, step, bins: hist.append((tag, values.tolist(), step,
                                                                                        bins)))
    trainer = SimpleNamespace(is_global_zero=True, loggers=[SimpleNamespace(experiment=writer)])
    ImportanceRatioMonitor(bins=7).on_train_batch_end(trainer, module, {"updates": updates},
                                                      SimpleNamespace(rollout_index=3), 0)
    lv = lambda xs: sum(math.log(x) ** 2 for x in xs) / len(xs) - (sum(math.log(x) for x in xs) / len(xs)) ** 2  # noqa
    expect = {
        # all tokens r = [2, 4, 1, 0.5]: token-weighted pooled moments
        "ratio/mean": 1.875, "ratio/var": 5.3125 - 1.875 ** 2, "ratio/log_var": lv([2, 4, 1, 0.5]),
        "ratio/eur": (0.2 + 0.9 + 1.0 + 0.4) / 4, "ratio/gated_frac": 0.5, "ratio/min": 0.5, "ratio/max": 4.0,
        "ratio/mean_pos": 3.0, "ratio/var_pos": 1.0, "ratio/log_var_pos": lv([2, 4]), "ratio/eur_pos": 0.55,
        "ratio/gated_frac_pos": 0.5, "ratio/min_pos": 2.0, "ratio/max_pos": 4.0,
        "ratio/mean_neg": 0.75, "ratio/var_neg": 0.0625, "ratio/log_var_neg": lv([1, 0.5]), "ratio/eur_neg": 0.7,
        "ratio/gated_frac_neg": 0.5, "ratio/min_neg": 0.5, "ratio/max_neg": 1.0,
        # update 0: r = [2, 4, 1] -> mean 7/3 (not the micro-batch means' mean 2), var 21/3 - 49/9 = 14/9
        "ratio/update_0/mean": 7 / 3, "ratio/update_0/var": 14 / 9, "ratio/update_0/log_var": lv([2, 4, 1]),
        "ratio/update_0/eur": 0.7, "ratio/update_0/gated_frac": 1 / 3, "ratio/update_0/min": 1.0,
        "ratio/update_0/max": 4.0,
        "ratio/update_1/mean": 0.5, "ratio/update_1/var": 0.0, "ratio/update_1/log_var": 0.0,
        "ratio/update_1/eur": 0.4, "ratio/update_1/gated_frac": 1.0, "ratio/update_1/min": 0.5,
        "ratio/update_1/max": 0.5,
    }
    assert logged == pytest.approx(expect, rel=1e-6, abs=1e-12)
    assert hist == [("ratio/hist_r", [2.0, 4.0, 1.0, 0.5], 3, 7), ("ratio/hist_gate_grad", pytest.approx([0.2, 0.9, 1.0, 0.4]), 3, 7)]


def test_eval_scores_hand_values():
    assert majority_answer(["3", None, "4", "4", "3"]) == "3"  # tie: first seen
    assert majority_answer([None, None]) is None
    rows = [{"correct": [1.0, 0.0, 0.0], "majority_correct": 0.0}, {"correct": [1.0, 1.0, 0.0], "majority_correct": 1.0}]
    # pass@2: 1 - C(2,2)/C(3,2) = 2/3 for one correct of 3, 1 for two correct; pass@3: any correct
    assert summarize(rows, sync=False) == pytest.approx(
        {"pass@1": 0.5, "pass@2": 5 / 6, "pass@3": 1.0, "avg@3": 0.5, "maj@3": 0.5, "problems": 2.0})


def test_two_ranks_equal_one_rank(tmp_path):
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests/scripts/monitor_ddp.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    synced, single = result["synced"], result["single"]
    assert set(synced) == set(single) and len(single) > 40
    assert result["rows_gathered"] and 0 < result["tokens"][0]
    for key, value in single.items():
        assert math.isfinite(value), key  # the fixture has tokens of every sign in every update
        assert synced[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


TINY_YAML = """
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  log_every_n_steps: 1
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs}}
  callbacks:
    - class_path: lit_sapo.callbacks.EntropyMonitor
    - class_path: lit_sapo.callbacks.ImportanceRatioMonitor
    - class_path: lit_sapo.callbacks.RolloutSamples
      init_args: {{every_n_steps: 1, num_samples: 2}}
    - class_path: lit_sapo.callbacks.BenchmarkEvaluation
      init_args: {{every_n_steps: 1, n_samples: 2, max_new_tokens: 8, limit: 3}}
    - class_path: tests.user_metrics.HighRatioFraction
      init_args: {{threshold: 1.0}}
    - class_path: tests.user_metrics.KeepOutputs
model:
  model: {{name: tiny-random-llama}}
  num_minibatches: 2
  micro_batch_size: 1
  optimizer: {{lr: 1.0e-3}}
data:
  tokenizer: ${{model.model.name}}
  sampler:
    class_path: lit_sapo.sampling.HFSampler
    init_args: {{max_new_tokens: 8}}
  rewards: {{tests.user_metrics.CharCountReward: 1.0}}
  grading_workers: 0
  prompts_per_step: 2
  num_generations: 2
"""


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _cat(updates, values, where):
    return torch.cat([values(u)[where(u)] for u in updates]).double()


def test_callbacks_from_yaml_with_a_user_metric(tmp_path, monkeypatch):
    from lit_sapo.cli import main
    from tests.user_metrics import KeepOutputs

    monkeypatch.syspath_prepend(str(REPO))  # jsonargparse imports class paths from the config file's folder
    config = tmp_path / "fit.yaml"
    config.write_text(TINY_YAML.format(root=tmp_path))
    cli = main(["fit", "--config", str(config)])
    log_dir = Path(cli.trainer.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").read_text().splitlines()))
    kept = next(c for c in cli.trainer.callbacks if isinstance(c, KeepOutputs)).outputs
    assert [o["batch"].rollout_index for o in kept] == [0, 1]
    user_values = []
    for out in kept:  # the logger step of a rollout's training row is its rollout index
        row = next(r for r in rows if r["entropy/mean"] and int(r["step"]) == out["batch"].rollout_index)
        ups = out["updates"]
        mask = lambda u: u.terms.mask  # noqa: E731
        pos = _cat(ups, lambda u: u.terms.ratio, lambda u: u.terms.mask & (u.terms.advantages > 0))
        if pos.numel():
            user_values.append(float(row["user/high_ratio_frac_pos"]))
            assert user_values[-1] == pytest.approx(float((pos > 1.0).double().mean()), rel=1e-6)
        ent = _cat([u for u in ups if u.epoch == 0], lambda u: u.entropy, mask)
        assert float(row["entropy/mean"]) == pytest.approx(float(ent.mean()), rel=1e-6)
        # ratio statistics are over the tokens that carry a gradient: valid and A != 0
        grad = lambda u: u.terms.mask & (u.terms.advantages != 0)  # noqa: E731
        for key, chosen in (("ratio/var", ups), ("ratio/update_1/var", [u for u in ups if (u.epoch, u.minibatch) == (0, 1)])):
            r = _cat(chosen, lambda u: u.terms.ratio, grad).double()
            if r.numel():
                assert float(row[key]) == pytest.approx(float(r.var(unbiased=False)), rel=1e-6, abs=1e-12)
        assert float(row["ratio/update_0/var"]) == 0.0  # the first inner update is on-policy
    assert user_values and max(user_values) > 0  # the fixture has tokens above the threshold
    # evaluation: baseline v0, then after every rollout (v1, v2); the end (v2) is not repeated
    for version in (0, 1, 2):
        lines = _jsonl(log_dir / "eval" / f"gsm8k_step{version}.jsonl")
        assert [x["id"] for x in lines] == ["gsm8k-test-0000", "gsm8k-test-0001", "gsm8k-test-0002"]
        assert all(len(x["completions"]) == 2 == len(x["correct"]) for x in lines)
        logged = [float(r["eval/gsm8k/pass@1"]) for r in rows if r.get("eval/gsm8k/pass@1") and int(r["step"]) == version]
        assert logged == [sum(sum(x["correct"]) for x in lines) / 6]
    samples = _jsonl(log_dir / "samples" / "rollout_samples.jsonl")
    assert [s["rollout"] for s in samples] == [0, 0, 1, 1]
    for s in samples:
        batch = kept[s["rollout"]]["batch"]
        assert (s["reward"], s["advantage"]) == pytest.approx((float(batch.rewards[s["row"]]),
                                                               float(batch.advantages[s["row"]])))


@pytest.mark.slow
def test_benchmark_evaluation_smollm2_regrades(tmp_path, monkeypatch):
    from lit_sapo.cli import main
    from lit_sapo.rewards import MathAccuracy, extract_answer

    monkeypatch.syspath_prepend(str(REPO))
    yaml = TINY_YAML.format(root=tmp_path).replace("tiny-random-llama", "smollm2-135m-instruct")
    yaml = yaml.replace("max_steps: 4", "max_steps: 1").replace("num_minibatches: 2", "num_minibatches: 1")
    yaml = yaml.replace("init_args: {every_n_steps: 1, n_samples: 2, max_new_tokens: 8, limit: 3}",
                        "init_args: {every_n_steps: 0, n_samples: 2, max_new_tokens: 64, limit: 5}")
    yaml = yaml.replace("rewards: {tests.user_metrics.CharCountReward: 1.0}", "rewards: {accuracy: 1.0}")
    config = tmp_path / "fit.yaml"
    config.write_text(yaml)
    cli = main(["fit", "--config", str(config)])
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, BenchmarkEvaluation))
    assert evaluation._own_grader is None  # graded by the run's own accuracy reward
    log_dir = Path(cli.trainer.log_dir)
    grader = MathAccuracy(workers=0)
    for version in (0, 1):  # the baseline and the end
        lines = _jsonl(log_dir / "eval" / f"gsm8k_step{version}.jsonl")
        assert len(lines) == 5
        for x in lines:
            assert x["correct"] == grader(x["completions"], [x["gold"]] * 2)
            assert x["extracted"] == [extract_answer(c) for c in x["completions"]]
            assert x["majority"] == majority_answer(x["extracted"])
            boxed = grader([f"\\boxed{{{x['majority']}}}"], [x["gold"]])[0] if x["majority"] is not None else 0.0
            assert x["majority_correct"] == boxed
    metrics = evaluation.last_metrics
    for key in ("eval/gsm8k/pass@1", "eval/gsm8k/avg@2", "eval/gsm8k/maj@2"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["eval/gsm8k/pass@1"] == pytest.approx(sum(sum(x["correct"]) for x in lines) / 10)
    assert metrics["eval/gsm8k/maj@2"] == pytest.approx(sum(x["majority_correct"] for x in lines) / 5)
