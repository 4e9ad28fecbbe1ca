"""CollapseWatch: a run that collapses silently (lr far too high: entropy at the uniform limit, grad_norm 0, rc 0)
gets one warning naming the rollout and the metric, and can be stopped.

It reads the metrics the module already logs each rollout (no extra computation, no collective):

- `train/entropy` rises to within `entropy_frac` of log(V), the entropy of the uniform distribution over the
  vocabulary, after an earlier rollout was below that: the policy no longer prefers any token (a randomly
  initialised model starts there, which is not a collapse);
- `train/ratio_max` above `ratio_max`: one token's probability moved by that factor within a rollout's updates;
- `rollout/zero_std_frac` == 1 for `zero_variance_rollouts` rollouts in a row: every group scored all-equal, so
  every advantage is 0 and nothing is learned.

Each condition warns once. Logged per rollout: `collapse/entropy_vs_uniform` (train/entropy / log V) and
`collapse/conditions` (how many conditions have fired so far).
"""

from __future__ import annotations

import math

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn


class CollapseWatch(Callback):
    """Warn once per condition of collapse (see the module docstring); `stop: true` also stops the run.

    Args:
        entropy_frac: fire when train/entropy >= (1 - entropy_frac) * log(V).
        ratio_max: fire when train/ratio_max exceeds this bound.
        zero_variance_rollouts: fire when rollout/zero_std_frac is 1 for this many rollouts in a row.
        stop: stop the run (trainer.should_stop) when a condition fires, after the checkpoint of that rollout.
    """

    def __init__(self, entropy_frac: float = 0.05, ratio_max: float = 100.0, zero_variance_rollouts: int = 5,
                 stop: bool = False) -> None:
        if not 0 < entropy_frac < 1:
            raise ValueError(f"CollapseWatch.entropy_frac: must be in (0, 1), got {entropy_frac}")
        if not ratio_max > 1:
            raise ValueError(f"CollapseWatch.ratio_max: must be > 1, got {ratio_max}")
        if zero_variance_rollouts < 1:
            raise ValueError(f"CollapseWatch.zero_variance_rollouts: must be >= 1, got {zero_variance_rollouts}")
        self.entropy_frac, self.ratio_max = entropy_frac, ratio_max
        self.zero_variance_rollouts, self.stop = zero_variance_rollouts, stop
        self.fired: dict[str, str] = {}  # condition -> its warning
        self._zero_variance_streak = 0
        self._entropy_was_below = False  # a rollout's entropy below the uniform bound has been seen

    @staticmethod
    def vocab_size(pl_module) -> int | None:
        head = getattr(pl_module, "head", None) if getattr(pl_module, "policy", None) is not None else None
        size = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [None])[0]
        return int(size) if size else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        value = lambda key: float(metrics[key]) if key in metrics else math.nan  # noqa: E731
        rollout = int(value("rollout/step")) if math.isfinite(value("rollout/step")) else batch_idx + 1
        vocab = self.vocab_size(pl_module)
        entropy, uniform = value("train/entropy"), math.log(vocab) if vocab and vocab > 1 else math.nan
        ratio, zero_std = value("train/ratio_max"), value("rollout/zero_std_frac")
        self._zero_variance_streak = self._zero_variance_streak + 1 if zero_std == 1.0 else 0

        near_uniform = entropy >= (1 - self.entropy_frac) * uniform
        if near_uniform and self._entropy_was_below:
            self._fire("entropy", trainer, f"rollout {rollout}: train/entropy {entropy:.4g} is within "
                       f"{self.entropy_frac:.0%} of log(V) = {uniform:.4g} (uniform over {vocab} tokens)")
        self._entropy_was_below = self._entropy_was_below or (math.isfinite(entropy) and not near_uniform)
        if ratio > self.ratio_max:
            self._fire("ratio_max", trainer, f"rollout {rollout}: train/ratio_max {ratio:.4g} exceeds "
                       f"{self.ratio_max:g}")
        if self._zero_variance_streak >= self.zero_variance_rollouts:
            self._fire("zero_variance", trainer, f"rollout {rollout}: rollout/zero_std_frac has been 1 for "
                       f"{self._zero_variance_streak} rollouts in a row (every advantage is 0)")
        pl_module.log_dict({"collapse/entropy_vs_uniform": entropy / uniform if uniform > 0 else math.nan,
                            "collapse/conditions": float(len(self.fired))}, on_step=True, batch_size=1)

    def _fire(self, condition: str, trainer, what: str) -> None:
        if condition in self.fired:
            return
        action = "stopping the run (CollapseWatch.stop)" if self.stop else "set CollapseWatch.stop to stop on it"
        self.fired[condition] = f"collapse: {what}; lower model.optimizer.lr or check the rewards; {action}"
        rank_zero_warn(self.fired[condition])
        if self.stop:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"fired": dict(self.fired), "zero_variance_streak": self._zero_variance_streak,
                "entropy_was_below": self._entropy_was_below}

    def load_state_dict(self, state: dict) -> None:
        self.fired = dict(state.get("fired", {}))
        self._zero_variance_streak = int(state.get("zero_variance_streak", 0))
        self._entropy_was_below = bool(state.get("entropy_was_below", False))
