"""RunSummary: at the end of fit, rank 0 prints what happened and where everything went (and, if asked, plots)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


class RunSummary(Callback):
    """Prints rollouts, wall time, reward first -> last, the paths of metrics, config, checkpoints and export,
    and the commands to resume or continue.

    Args:
        plot: also draw the run's curves as PNG (lit_sapo.plots.plot_runs) into the log folder; skipped quietly
            if that module is absent.
    """

    def __init__(self, plot: bool = False) -> None:
        self.plot = plot
        self.start = None
        self.rewards: list[float] = []
        self.lines: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = getattr(batch, "metrics", None) or {}
        if "reward/mean" in metrics:
            self.rewards.append(float(metrics["reward/mean"]))

    def on_train_end(self, trainer, pl_module) -> None:
        # trainer.log_dir broadcasts from rank 0 under multi-process strategies: every rank must call it
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        wall = time.perf_counter() - (self.start or time.perf_counter())
        rollouts = int(getattr(trainer.datamodule, "rollouts_consumed", len(self.rewards)))
        lines = [f"lit-sapo: {rollouts} rollouts ({trainer.global_step} optimizer steps) in {_duration(wall)}"]
        if self.rewards:
            lines.append(f"  reward       {self.rewards[0]:.3f} (first rollout) -> {self.rewards[-1]:.3f} (last)")
        if (log_dir / "metrics.csv").exists():
            lines.append(f"  metrics      {log_dir / 'metrics.csv'}")
        config = log_dir / "config.yaml"
        if config.exists():
            lines.append(f"  config       {config}")
        last = None
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                last = Path(cb.dirpath) / "last.ckpt"
                lines.append(f"  checkpoints  {cb.dirpath}")
            if type(cb).__name__ == "ExportHF":
                lines.append(f"  export       {getattr(cb, 'dirpath', None) or Path(trainer.default_root_dir) / 'hf_model'}")
        if last is not None and last.exists():
            base = f"lit-sapo fit --config {config}" if config.exists() else "lit-sapo fit <your --config ...>"
            lines.append(f"  resume       {base} --ckpt_path {last}")
            lines.append(f"  continue     {base} --ckpt_path {last} --trainer.max_steps {2 * trainer.global_step}")
            lines.append(f"  export       python -m lit_sapo.export {last} <out_dir>")
        if self.plot:
            try:
                from lit_sapo.plots import plot_runs
            except ImportError:
                pass
            else:
                for png in plot_runs([log_dir], log_dir):
                    lines.append(f"  curves       {png}")
        self.lines = lines
        print("\n".join(lines), file=sys.stdout, flush=True)
