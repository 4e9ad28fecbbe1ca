"""RolloutCheckpoint: Lightning's ModelCheckpoint whose last.ckpt is a hard link to the newest checkpoint.

`save_last: true` writes every checkpoint twice (the step file and a full last.ckpt: 2 x 1.6 GB for SmolLM2);
Lightning's `save_last: link` makes a symbolic link, which dangles for a moment each time top-k removes the file
it points to (a kill then leaves no last.ckpt). A hard link is one copy on disk, survives the removal of the step
file, and is swapped in with a rename, so last.ckpt always names a complete checkpoint. Where hard links are not
possible (another file system) Lightning's symbolic link (or copy) is used.
"""

from __future__ import annotations

import os
import shutil

from lightning.pytorch.callbacks import ModelCheckpoint


class RolloutCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with `save_last="link"` by default, the link being a hard link (see the module docstring).

    Takes ModelCheckpoint's arguments.
    """

    def __init__(self, *args, save_last="link", **kwargs) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if not _hard_link(filepath, linkpath):
                # no hard link here (a sharded checkpoint directory, another file system): Lightning's way
                _symlink_or_copy(filepath, linkpath)
        trainer.strategy.barrier()


def _hard_link(filepath: str, linkpath: str) -> bool:
    tmp = os.path.join(os.path.dirname(linkpath), f".{os.path.basename(linkpath)}.link-{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.link(filepath, tmp)
        if os.path.isdir(linkpath) and not os.path.islink(linkpath):
            shutil.rmtree(linkpath)
        os.replace(tmp, linkpath)  # atomic: last.ckpt is the old or the new checkpoint, never missing
        return True
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)
        return False


def _symlink_or_copy(filepath: str, linkpath: str) -> None:
    if os.path.islink(linkpath) or os.path.isfile(linkpath):
        os.remove(linkpath)
    elif os.path.isdir(linkpath):
        shutil.rmtree(linkpath)
    try:
        os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), linkpath)
    except OSError:
        (shutil.copytree if os.path.isdir(filepath) else shutil.copy)(filepath, linkpath)
