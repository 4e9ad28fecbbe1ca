"""Checks and defaults of `lit-sapo` that run before any model is loaded, and its exit lines (used by lit_sapo.cli).

Every bad input ends in one line, `lit-sapo: error: <setting or file>: <what is wrong>; <the fix>`, exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
LIGHTNING_CSV_FLUSH_DEFAULT = 100


def _items(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def default_csv_flush(config: Any) -> None:
    """trainer.logger CSVLogger(s): flush_logs_every_n_steps 1 (one row per rollout) unless set to another value."""
    trainer = getattr(config, "trainer", None) if config is not None else None
    for logger in _items(getattr(trainer, "logger", None)):
        class_path = getattr(logger, "class_path", None)
        init_args = getattr(logger, "init_args", None)
        if class_path in (CSV_LOGGER, "lightning.pytorch.loggers.csv_logs.CSVLogger") and init_args is not None:
            if getattr(init_args, "flush_logs_every_n_steps", None) in (None, LIGHTNING_CSV_FLUSH_DEFAULT):
                init_args.flush_logs_every_n_steps = 1


def sigterm_line(trainer: Any) -> str:
    """The one line printed when SIGTERM stopped a run: where it stopped, what was saved, how to resume."""
    rollouts = getattr(getattr(trainer, "datamodule", None), "rollouts_consumed", None)
    where = f"after rollout {rollouts}, optimizer step {trainer.global_step}" if rollouts is not None else \
        f"at optimizer step {trainer.global_step}"
    callback = getattr(trainer, "checkpoint_callback", None)
    path = ""
    if callback is not None:
        path = getattr(callback, "last_model_path", "") or getattr(callback, "_last_checkpoint_saved", "") or ""
    if path and os.path.exists(path):
        return f"lit-sapo: stopped by SIGTERM {where}; checkpoint {path}; resume with --ckpt_path {path}"
    return (f"lit-sapo: stopped by SIGTERM {where}; no checkpoint written (add a ModelCheckpoint callback, "
            "e.g. as configs/quickstart.yaml does, to save one on the way out)")


def error_line(message: str) -> str:
    return f"lit-sapo: error: {message}"


def check_ckpt_path(ckpt_path: str | None) -> None:
    """--ckpt_path: an existing, loadable file (or Lightning's 'last' / 'best' / 'hpc' / 'registry' keywords)."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return
    path = Path(ckpt_path)
    if path.is_dir():
        if not (path / "meta.pt").exists():
            raise ValueError(f"--ckpt_path: {path} is a directory but not a sharded Lightning checkpoint (no meta.pt)")
        return
    if not path.exists():
        raise ValueError(f"--ckpt_path: {path} does not exist; give the path of a .ckpt file (e.g. "
                         "<checkpoints dir>/last.ckpt) or 'last'")
