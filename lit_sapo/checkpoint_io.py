"""Checkpoint files written beside their target: `<dir>/.<name>.tmp-<pid>`, then renamed over it (atomic).

Lightning's TorchCheckpointIO serializes into memory, then writes through an fsspec transaction whose temp file is
made by `tempfile.mkstemp()`: in $TMPDIR, which a killed save leaves behind (545 MB for SmolLM2), and on another
file system the rename becomes a second full copy. Here the temp file sits in the target's folder (same file
system: `os.replace` is a rename), is removed when the save fails, and a temp file a killed save left behind is
removed by the next save into that folder. Remote paths (`s3://...`) keep Lightning's code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol


def temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def stale_temp_files(folder: Path) -> list[Path]:
    """Temp files in `folder` left by saves of processes that are gone (a killed run)."""
    out = []
    for path in folder.glob(".*.tmp-*") if folder.is_dir() else []:
        pid = path.name.rpartition(".tmp-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            out.append(path)
    return sorted(out)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one checkpoint at a time: its own leftovers are stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_beside(checkpoint: dict[str, Any], target: str | os.PathLike) -> None:
    """torch.save `checkpoint` to `target` through a temp file in the same folder; no partial file survives."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files(target.parent):
        stale.unlink(missing_ok=True)
    tmp = temp_path(target)
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)  # streamed to the file: no second in-memory copy of the checkpoint
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class BesideTargetCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves go through :func:`save_beside` (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_beside(checkpoint, path)


def install(trainer) -> None:
    """Use BesideTargetCheckpointIO where the strategy would use Lightning's plain TorchCheckpointIO."""
    strategy = trainer.strategy
    if type(getattr(strategy, "_checkpoint_io", None)) in (type(None), TorchCheckpointIO):
        strategy.checkpoint_io = BesideTargetCheckpointIO()
