"""What a user sees on the console of a tiny fit: a rollout bar, no Lightning noise, a summary with the paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_fit_console(tmp_path):
    cmd = [sys.executable, "-m", "lit_sapo.cli", "fit", "--config", str(ROOT / "tests/data/tiny.yaml"),
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=ModelCheckpoint",
           f"--trainer.callbacks.dirpath={tmp_path}/checkpoints", "--trainer.callbacks.save_last=true"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("GPU available", "TPU available", "litlogger", "Epoch 0/-2", "v_num", "LeafSpec", "| Name"):
        assert noise not in text, noise
    assert "rollout: 100%" in text and "2/2" in text and "phase=" in text  # 4 optimizer steps / 2 per rollout
    log_dir = tmp_path / "logs" / "version_0"
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists()
    assert "lit-sapo: 2 rollouts (4 optimizer steps) in " in proc.stdout
    assert f"metrics      {log_dir / 'metrics.csv'}" in proc.stdout
    assert f"config       {log_dir / 'config.yaml'}" in proc.stdout
    assert f"checkpoints  {tmp_path / 'checkpoints'}" in proc.stdout
    assert f"resume       lit-sapo fit --config {log_dir / 'config.yaml'} --ckpt_path {last}" in proc.stdout
    assert f"--ckpt_path {last} --trainer.max_steps 8" in proc.stdout
    assert "reward       0.000 (first rollout) -> " in proc.stdout
