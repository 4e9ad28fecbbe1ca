"""Fault injection, for real: a reward that hangs, SIGTERM and SIGKILL sent to a `lit-sapo fit` subprocess, a
checkpoint write killed half-way. See docs/reliability.md for the table of faults and what the run does."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

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
