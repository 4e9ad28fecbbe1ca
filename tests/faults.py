"""Faulty components the fault-injection tests load by class path (tests/test_faults.py)."""

from __future__ import annotations

import time


class SleepingReward:
    """A user reward that never returns (a hung HTTP call, a deadlock): sleeps 1e6 s."""

    name = "sleepy"

    def __call__(self, completions, answers, prompts):
        time.sleep(1e6)
        return [0.0] * len(completions)


class HangsAfterFirstCall:
    """Scores completion length on its first batch, then hangs forever: a run stuck in grading."""

    name = "hangs_later"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, completions, answers, prompts):
        self.calls += 1
        if self.calls > 1:
            time.sleep(1e6)
        return [len(c) / 100.0 for c in completions]
