"""Faulty components the fault-injection tests load by class path (tests/test_faults.py)."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from lightning.pytorch import Callback


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


class KillDuringSave(Callback):
    """SIGKILLs its own process while the `at_save`-th checkpoint file is being written: a watcher thread kills as
    soon as a temp file of the write appears (beside the target or in $TMPDIR), or after 10 s regardless."""

    def __init__(self, dirpath: str, at_save: int = 2) -> None:
        self.dirpath, self.at_save, self.saves = dirpath, at_save, 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves += 1
        if self.saves == self.at_save:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 10
        beside, tmpdir = Path(self.dirpath), Path(tempfile.gettempdir())
        while time.monotonic() < deadline:
            # lit_sapo's temp file: .<name>.tmp-<pid> beside the target; fsspec's (Lightning's default): tmp* in $TMPDIR
            if any(p.name.startswith(".") for p in beside.iterdir()) or any(
                    p.name.startswith("tmp") for p in tmpdir.iterdir()):
                break
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGKILL)
