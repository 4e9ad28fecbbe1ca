"""A user's own metric callback and reward, loaded by class path from YAML in tests/test_callbacks.py.

The callback is the example of docs/callbacks.md ("Your own metrics"); tests/test_docs.py keeps the two in step.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback


class HighRatioFraction(Callback):
    """Fraction of positive-advantage tokens whose importance ratio r exceeds `threshold`, per rollout step."""

    def __init__(self, threshold: float = 1.2) -> None:
        self.threshold = threshold

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        above = total = 0.0
        for record in outputs["updates"]:  # one UpdateRecord per micro-batch of every inner update
            t = record.terms
            pos = t.mask & (t.advantages > 0)
            above += float((t.ratio[pos] > self.threshold).sum())
            total += float(pos.sum())
        # sum the counts over ranks (exact), not the per-rank fractions
        counts = pl_module.all_gather(torch.tensor([above, total], device=pl_module.device)).reshape(-1, 2).sum(0)
        if counts[1] > 0:
            pl_module.log("user/high_ratio_frac_pos", counts[0] / counts[1], on_step=True, batch_size=1)


class CharCountReward:
    """A toy reward with spread (completion length in characters, mod 4, over 3) so that advantages are nonzero."""

    name = "chars"

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
        return [(len(c) % 4) / 3 for c in completions]


class KeepOutputs(Callback):
    """Keeps every rollout step's `outputs` (test helper: recompute logged values from the returned data)."""

    def __init__(self) -> None:
        self.outputs: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.outputs.append(outputs)
