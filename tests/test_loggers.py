"""Logger overlays: TensorBoard for real (event files read back equal the CSV), W&B offline if wandb imports."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from lit_sapo import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny.yaml"


def _fit(overlay: str, root: Path):
    return cli.main(["fit", "--config", str(TINY), "--config", str(ROOT / "configs" / "loggers" / overlay),
                     "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
                     "--trainer.enable_progress_bar", "false"])


def _csv_rows(root: Path) -> list[dict]:
    (path,) = root.glob("logs/version_*/metrics.csv")
    return list(csv.DictReader(path.read_text().splitlines()))


def test_tensorboard_overlay_writes_the_csv_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit("tensorboard.yaml", tmp_path)
    (events,) = tmp_path.glob("tensorboard/version_*/events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    rows = _csv_rows(tmp_path)
    checked = 0
    for tag in ("train/loss", "reward/mean", "completion/len_mean", "rollout/step"):
        scalars = {e.step: e.value for e in acc.Scalars(tag)}
        from_csv = {int(r["step"]): float(r[tag]) for r in rows if r.get(tag)}
        assert scalars.keys() == from_csv.keys() == {0, 1}  # 4 optimizer steps = 2 rollouts, step = rollout
        for step, value in from_csv.items():
            assert scalars[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
            checked += 1
    assert checked == 8


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_overlay_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _fit("wandb.yaml", tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert _csv_rows(tmp_path)
