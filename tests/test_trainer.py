"""End to end through `lit-sapo fit`: fresh weights for every rollout, exact resume, a real model that learns."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from lit_sapo import cli
from lit_sapo.models import ModelSpec, load_policy

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny.yaml"
LENGTH_REWARD = '{"tests.recorders.LengthReward": 1.0}'


def fit(tmp_path: Path, *args: str, records: str = "records.jsonl"):
    return cli.main(["fit", "--config", str(TINY), "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--trainer.callbacks+=tests.recorders.RolloutRecorder",
                     f"--trainer.callbacks.path={tmp_path / records}", *args])


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_metrics(tmp_path: Path) -> list[dict]:
    files = sorted(tmp_path.rglob("metrics.csv"))
    assert files, "no CSV metrics written"
    return list(csv.DictReader(files[-1].open()))


def test_every_rollout_is_sampled_by_the_newest_weights(tmp_path):
    fit(tmp_path, "--trainer.max_steps", "8", "--data.rewards", LENGTH_REWARD)  # 4 rollouts x 2 updates
    records = read_records(tmp_path / "records.jsonl")
    assert [r["rollout_index"] for r in records] == [0, 1, 2, 3]
    for i, r in enumerate(records):
        # Lightning prefetched the next prompt batch, yet rollout i was sampled after update i-1
        assert r["batch_version"] == r["module_version"] == r["sampler_version"] == i
        assert r["module_version_after"] == i + 1
        assert r["global_step"] == 2 * i  # global_step counts optimizer steps: 2 per rollout


def test_a_stale_rollout_is_refused(tmp_path):
    result = fit(tmp_path, "--trainer.max_steps", "2", "--data.rewards", LENGTH_REWARD)
    module, dm = result.model, result.datamodule
    dm.setup("fit")  # fit's teardown closed the grader pool
    batch = dm.make_rollout(next(iter(dm.train_dataloader())), module)
    module.weight_version += 1  # as if an update happened after sampling
    with pytest.raises(RuntimeError, match="stale rollout"):
        module.training_step(batch, 0)


def test_resume_continues_the_stream_and_the_run_exactly(tmp_path):
    ckpt_args = ["--trainer.enable_checkpointing", "true", "--trainer.max_steps", "8", "--data.rewards", LENGTH_REWARD,
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1"]
    straight = tmp_path / "straight"
    fit(straight, *ckpt_args, f"--trainer.callbacks.dirpath={straight / 'ckpt'}")
    full = read_records(straight / "records.jsonl")
    ckpt = sorted((straight / "ckpt").glob("*step=4*.ckpt"))
    assert ckpt, list((straight / "ckpt").iterdir())
    resumed = tmp_path / "resumed"
    fit(resumed, *ckpt_args, f"--trainer.callbacks.dirpath={resumed / 'ckpt'}", "--ckpt_path", str(ckpt[0]))
    tail = read_records(resumed / "records.jsonl")
    assert [r["rollout_index"] for r in tail] == [2, 3]
    for a, b in zip(full[2:], tail):
        assert a["prompts"] == b["prompts"] and a["completions"] == b["completions"]
        assert a["batch_version"] == b["batch_version"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-7)
    assert full[0]["prompts"] != full[2]["prompts"]  # the stream moved on; it did not restart


REQUIRED = ["train/loss", "train/eur", "train/ratio_var", "train/gated_frac", "train/clip_frac", "train/kl",
            "train/grad_norm", "reward/mean", "reward/std", "reward/accuracy", "reward/length",
            "completion/len_mean", "completion/truncated_frac", "rollout/step", "rollout/zero_std_frac",
            "grading/timeouts"]


@pytest.mark.slow
def test_smollm2_fit_changes_weights_and_logs_finite_metrics(tmp_path):
    result = fit(tmp_path, "--model.model.name", "smollm2-135m-instruct", "--trainer.max_steps", "4",
                 "--model.optimizer.lr", "1e-5", "--data.sampler.init_args.max_new_tokens", "16",
                 "--data.rewards", '{"accuracy": 1.0, "tests.recorders.LengthReward": 0.1}')
    trained = dict(result.model.policy.named_parameters())
    fresh = dict(load_policy(ModelSpec(name="smollm2-135m-instruct")).named_parameters())
    changed = [n for n, p in fresh.items() if not torch.equal(p, trained[n].detach())]
    assert len(changed) > len(fresh) // 2
    rows = read_metrics(tmp_path)
    assert len(rows) == 2  # 2 rollouts x 2 inner updates = 4 optimizer steps
    for row in rows:
        for key in REQUIRED:
            assert key in row and math.isfinite(float(row[key])), (key, row.get(key))
    assert [float(r["rollout/step"]) for r in rows] == [1.0, 2.0]
    records = read_records(tmp_path / "records.jsonl")
    assert all(len(r["completions"]) == 4 for r in records)  # 2 prompts x 2 generations
