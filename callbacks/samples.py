"""RolloutSamples: a few prompts, completions, rewards and advantages of the last rollout, to a file and loggers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch import Callback

COLUMNS = ["rollout", "group", "prompt", "completion", "answer", "reward", "advantage"]


class RolloutSamples(Callback):
    """Every `every_n_steps` rollout steps (after rollouts N, 2N, ...), `num_samples` rows of the rollout.

    Rows are drawn at random (seeded by the rollout index: reproducible) from rank 0's share of the rollout and
    appended to `<output_dir or trainer.log_dir>/samples/rollout_samples.jsonl` (one JSON object per row, with
    the rollout index, which is the logger step of that rollout's training row). Loggers that show tables get
    one too, key `samples`: WandbLogger through `log_table`, TensorBoard as a markdown table through
    `add_text`. Loggers with neither (CSV): the file only.
    """

    def __init__(self, every_n_steps: int = 10, num_samples: int = 4, output_dir: str | None = None) -> None:
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError("RolloutSamples: every_n_steps and num_samples must be >= 1")
        self.every_n_steps, self.num_samples, self.output_dir = every_n_steps, num_samples, output_dir
        self._file: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._file is None:  # trainer.log_dir broadcasts: every rank must ask
            self._file = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir) / "samples" / \
                "rollout_samples.jsonl"
        if (batch.rollout_index + 1) % self.every_n_steps or not trainer.is_global_zero:
            return
        rows = self.sample_rows(batch)
        self._file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._file, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        table = [[r[c] for c in COLUMNS] for r in rows]
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="samples", columns=COLUMNS, data=table, step=batch.rollout_index)
            elif hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("samples", _markdown(table), batch.rollout_index)

    def sample_rows(self, batch) -> list[dict]:
        generator = torch.Generator().manual_seed(batch.rollout_index)
        picked = sorted(torch.randperm(batch.size, generator=generator)[: self.num_samples].tolist())
        return [{"rollout": batch.rollout_index, "weight_version": batch.weight_version, "row": i,
                 "group": int(batch.group_ids[i]), "prompt": batch.prompts[i], "completion": batch.completions[i],
                 "answer": batch.answers[i], "reward": float(batch.rewards[i]),
                 "advantage": float(batch.advantages[i]),
                 "rewards": {name: float(v[i]) for name, v in batch.reward_components.items()}} for i in picked]


def _markdown(table: list[list]) -> str:
    def cell(v) -> str:
        return (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|").replace("\n", "<br>")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in table])
