"""Helpers the trainer tests load by class path from YAML / the command line."""

from __future__ import annotations

import json

from lightning.pytorch import Callback


class LengthReward:
    """A reward that always varies within a group: completion length in characters / 100."""

    name = "length"

    def __call__(self, completions, answers, prompts):
        return [len(c) / 100.0 for c in completions]


class RolloutRecorder(Callback):
    """Writes, per rollout, what the trainer saw: versions, prompts, completions, loss (JSONL at `path`; a
    `{rank}` in it becomes the process's rank, one file per rank)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = {"batch_idx": batch_idx, "rollout_index": batch.rollout_index,
                       "batch_version": batch.weight_version, "module_version": pl_module.weight_version,
                       "sampler_version": trainer.datamodule.sampler.weight_version,
                       "global_step": trainer.global_step}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = dict(self._start, prompts=batch.prompts, completions=batch.completions,
                      rewards=batch.rewards.tolist(), loss=float(outputs["loss"]),
                      module_version_after=pl_module.weight_version)
        with open(self.path.format(rank=trainer.global_rank), "a") as f:
            f.write(json.dumps(record) + "\n")
