"""Fault injection, for real: a reward that hangs, SIGTERM and SIGKILL sent to a `lit-sapo fit` subprocess, a
checkpoint write killed half-way. See docs/reliability.md for the table of faults and what the run does."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_sapo import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny.yaml"


def _fit(tmp_path, *extra, rewards=None):
    rewards = rewards or {"tests.recorders.LengthReward": 1.0}
    return cli.main(["fit", "--config", str(TINY), "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.rewards", json.dumps(rewards),
                     *extra])


class _Stalled(Exception):
    pass


@pytest.fixture
def stall_guard():
    """Fails the test (instead of hanging the suite) if the main thread is still busy after 60 s."""
    def on_alarm(signum, frame):
        raise _Stalled("the run stalled for 60 s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_hanging_user_reward_times_out_scores_zero_and_the_run_finishes(tmp_path, stall_guard):
    result = _fit(tmp_path, "--data.reward_timeout", "0.5", "--trainer.max_steps", "4",
                  rewards={"tests.faults.SleepingReward": 1.0, "tests.recorders.LengthReward": 1.0})
    trainer, metrics = result.trainer, result.trainer.callback_metrics
    assert trainer.global_step == 4  # both rollouts ran their 2 optimizer steps each
    # each rollout: 2 prompts x 2 completions, all 4 scored 0 by the hung reward and counted as timeouts
    assert float(metrics["grading/timeouts"]) == 4.0
    assert float(metrics["reward/sleepy"]) == 0.0
    assert float(metrics["reward/length"]) > 0.0  # the other reward still scores
    assert float(metrics["grading/errors"]) == 0.0


def test_reward_timeout_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _fit(tmp_path, "--data.reward_timeout", "0")
    assert exc.value.code == 2
    assert "data.reward_timeout" in capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------- subprocess runs: signals

def _start_fit(tmp_path: Path, *extra: str, rewards: dict, checkpoint: str = "lightning.pytorch.callbacks.ModelCheckpoint",
               save_last: str = "true", env: dict | None = None) -> subprocess.Popen:
    """`lit-sapo fit` on the tiny config in a subprocess: a checkpoint every rollout (2 optimizer steps)."""
    args = [sys.executable, "-m", "lit_sapo.cli", "fit", "--config", str(TINY),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.logger.init_args.version", "0", "--trainer.max_steps", "400",
            "--trainer.enable_progress_bar", "false", "--data.rewards", json.dumps(rewards),
            "--trainer.enable_checkpointing", "true",
            f"--trainer.callbacks+={checkpoint}",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=2",
            f"--trainer.callbacks.save_last={save_last}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _csv_rows(tmp_path: Path, version: int = 0) -> list[dict]:
    path = tmp_path / "logs" / f"version_{version}" / "metrics.csv"
    if not path.exists():
        return []
    return [r for r in csv.DictReader(path.open()) if r.get("rollout/step")]


def _wait_for_rows(proc: subprocess.Popen, tmp_path: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_csv_rows(tmp_path)) < n:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {n} rollout rows in metrics.csv after {timeout} s")
        time.sleep(0.1)


def _rollouts_in(ckpt: Path) -> int:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain data: no pickle code runs
    return int(state["RolloutDataModule"]["rollouts_consumed"])


def test_sigterm_while_a_reward_hangs_saves_last_ckpt_and_exits_within_seconds(tmp_path):
    # the reward hangs from rollout 2 on; its bound is far away (600 s): only SIGTERM can end the run
    proc = _start_fit(tmp_path, "--data.reward_timeout", "600", rewards={"tests.faults.HangsAfterFirstCall": 1.0})
    _wait_for_rows(proc, tmp_path, 1)
    time.sleep(1.0)  # now grading rollout 2, stuck in the hung reward
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM did not end the run within 30 s")
    took = time.monotonic() - sent
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("lit-sapo: stopped by SIGTERM")]
    assert len(lines) == 1 and "after rollout 1," in lines[0] and "last.ckpt" in lines[0], err[-2000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists() and _rollouts_in(last) == 1
    assert took < 30


def test_after_sigkill_the_csv_holds_every_checkpointed_rollout_and_resume_neither_loses_nor_repeats(tmp_path):
    rewards = {"tests.recorders.LengthReward": 1.0}
    proc = _start_fit(tmp_path, rewards=rewards)
    _wait_for_rows(proc, tmp_path, 3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    consumed = _rollouts_in(tmp_path / "ckpt" / "last.ckpt")
    before = [int(float(r["rollout/step"])) for r in _csv_rows(tmp_path)]
    assert consumed >= 3
    # the checkpoint is written at the end of a rollout, the row right after it: the CSV holds every rollout the
    # checkpoint holds (with Lightning's default of a flush every 100 steps it held none of them)
    assert before == list(range(1, consumed + 1))
    # resume in a new logger version: it starts at the next rollout and writes each later rollout once
    total = consumed + 2
    resumed = _start_fit(tmp_path, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                         "--trainer.logger.init_args.version", "1", "--trainer.max_steps", str(2 * total),
                         rewards=rewards)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    after = [int(float(r["rollout/step"])) for r in _csv_rows(tmp_path, version=1)]
    assert before + after == list(range(1, total + 1))


# ------------------------------------------------------------------------------------------- checkpoint files

def test_last_ckpt_is_a_hard_link_to_the_newest_checkpoint_not_a_second_copy(tmp_path):
    ckpt = tmp_path / "ckpt"
    _fit(tmp_path, "--trainer.max_steps", "6", "--trainer.enable_checkpointing", "true",
         "--trainer.callbacks+=lit_sapo.callbacks.RolloutCheckpoint", f"--trainer.callbacks.dirpath={ckpt}",
         "--trainer.callbacks.every_n_train_steps=2")
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["epoch=0-step=6.ckpt", "last.ckpt"]  # no temp file left beside them
    last, newest = ckpt / "last.ckpt", ckpt / "epoch=0-step=6.ckpt"
    assert not last.is_symlink() and last.stat().st_ino == newest.stat().st_ino and last.stat().st_nlink == 2
    assert _rollouts_in(last) == 3


def test_a_checkpoint_write_killed_half_way_leaves_nothing_in_tmpdir_and_the_next_save_cleans_up(tmp_path):
    tmpdir, ckpt = tmp_path / "tmpdir", tmp_path / "ckpt"
    tmpdir.mkdir()
    proc = _start_fit(tmp_path, "--trainer.callbacks+=tests.faults.KillDuringSave", f"--trainer.callbacks.dirpath={ckpt}",
                      rewards={"tests.recorders.LengthReward": 1.0}, checkpoint="lit_sapo.callbacks.RolloutCheckpoint",
                      save_last="link", env={"TMPDIR": str(tmpdir)})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("tmp")] == []  # Lightning's default left one here
    leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".epoch=0-step=4.ckpt.tmp-"), leftovers
    assert _rollouts_in(ckpt / "last.ckpt") == 1  # the previous checkpoint is whole
    from lit_sapo.checkpoint_io import save_beside

    save_beside({"rollouts": 2}, ckpt / "next.ckpt")  # the next save into the folder removes the dead run's temp file
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt", "next.ckpt"]
