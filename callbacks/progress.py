"""RolloutProgressBar: the console bar counts rollouts against the run's total and says what a rollout is doing.

Lightning's bar counts batches against `max_steps`, which counts optimizer steps here (one rollout =
ppo_epochs x num_minibatches of them), and has no epoch total on an infinite stream (`Epoch 0/-2`). This one
shows `rollout 7/20`, the last reward and EUR, and the phase (sampling / grading / updating) that the datamodule
announces through `show_phase` while a rollout runs. Integers print as integers; `v_num` is dropped.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import TQDMProgressBar

# prog-bar keys of SAPOModule and what the bar calls them; train/eur comes from the logged metrics
_SHOWN = {"reward": "reward", "train/eur": "EUR", "loss": "loss"}


def rollouts_total(trainer, pl_module) -> int | None:
    """Rollouts of the run: max_steps (optimizer steps) / (ppo_epochs * num_minibatches); None if unbounded."""
    hp = getattr(pl_module, "hparams", {})
    per_rollout = int(hp.get("ppo_epochs", 1)) * int(hp.get("num_minibatches", 1))
    if trainer.max_steps is None or trainer.max_steps < 0:
        return None
    return math.ceil(trainer.max_steps / max(per_rollout, 1))


def _fmt(value) -> str | int:
    value = float(value)
    if value.is_integer() and abs(value) < 1e9:
        return int(value)
    return f"{value:.3g}"


class RolloutProgressBar(TQDMProgressBar):
    """TQDM bar over rollouts with reward, EUR and the current phase."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.phase = ""

    @property
    def total_train_batches(self):
        total = rollouts_total(self.trainer, self.trainer.lightning_module)
        return total if total is not None else super().total_train_batches

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("rollout")

    def get_metrics(self, trainer, pl_module) -> dict:
        logged = trainer.callback_metrics
        shown = {label: _fmt(logged[key]) for key, label in _SHOWN.items() if key in logged}
        if self.phase:
            shown["phase"] = self.phase
        return shown

    def show_phase(self, phase: str) -> None:
        """Called by the datamodule as a rollout moves on: sampling -> grading -> updating."""
        self.phase = phase
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(self.get_metrics(self.trainer, self.trainer.lightning_module))
