"""Checks and defaults of `lit-sapo` that run before any model is loaded, and its exit lines (used by lit_sapo.cli).

Every bad input ends in one line, `lit-sapo: error: <setting or file>: <what is wrong>; <the fix>`, exit status 2.
"""

from __future__ import annotations

import os
import re
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
    if path.is_file():
        _check_loadable(path)


def _check_loadable(path: Path) -> None:
    """A checkpoint file must at least be a zip archive (torch.save's format) holding a data.pkl; a truncated or
    foreign file fails here in one line instead of deep inside torch.load after the model has loaded."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"--ckpt_path: {path} is not a torch checkpoint (not a zip archive; truncated or another "
                         "format?); give a .ckpt written by lit-sapo, e.g. <checkpoints dir>/last.ckpt")
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("data.pkl") for name in archive.namelist()):
            raise ValueError(f"--ckpt_path: {path} is a zip archive but not a torch checkpoint (no data.pkl)")


# -------------------------------------------------------------------------------------- argv and parse errors

_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)


def join_negative_values(argv: list[str]) -> list[str]:
    """`--model.optimizer.lr -1e-3` -> `--model.optimizer.lr=-1e-3`: argparse reads '-1e-3' as an option (it only
    takes plain negatives like -1 or -0.5 as values), which makes the real error (a negative lr) unreachable."""
    out: list[str] = []
    for token in argv:
        if out and _NEGATIVE_NUMBER.match(token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def check_yaml_files(argv: list[str]) -> None:
    """Every `--config FILE` parses as YAML; a file that does not is named with the line and column of the fault
    (jsonargparse reports the scanner error without the file)."""
    import yaml

    files = [argv[i + 1] for i, t in enumerate(argv[:-1]) if t in ("--config", "-c")]
    files += [t.split("=", 1)[1] for t in argv if t.startswith("--config=")]
    for name in files:
        path = Path(name)
        if not path.is_file():
            if name.lstrip().startswith(("{", "[")) or ":" in name:
                continue  # an inline YAML/JSON string, which jsonargparse also accepts
            raise ValueError(f"--config: {name} does not exist; give the path of a YAML file, e.g. "
                             "configs/quickstart.yaml")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{name}: not valid YAML{where} ({problem}); fix the file") from None


def _unknown_key(message: str) -> str | None:
    match = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    match = re.search(r"does not accept (?:nested )?(?:key|option) '([\w.]+)'", message)
    if match:
        return match.group(1)
    match = re.search(r"unrecognized arguments: --([\w.]+)", message)
    return match.group(1) if match else None


def one_line_parse_error(message: str, known_keys: list[str]) -> str:
    """A jsonargparse error as one line: an unknown key gets the closest known keys ('did you mean'); a union or
    nested error keeps the line that names our own setting; anything else keeps its first line."""
    import difflib

    key = _unknown_key(message)
    if key is not None:
        close = difflib.get_close_matches(key, known_keys, n=2, cutoff=0.75)
        if not close:  # a typo in the leaf name only: compare leaves under the same parent
            parent, _, leaf = key.rpartition(".")
            leaves = [k for k in known_keys if k.rpartition(".")[0] == parent]
            close = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in leaves], n=2, cutoff=0.6)
            close = [f"{parent}.{c}" if parent else c for c in close]
        hint = f"did you mean {' or '.join(close)}?" if close else "see `lit-sapo fit --help` for the settings"
        return f"{key}: no such setting; {hint}"
    return own_setting_line(message)


def own_setting_line(message: str) -> str:
    """The line of a (multi-line, union) error that names one of our settings, e.g. 'data.sampler.x: must ...'."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    for line in lines:
        if re.match(r"^(--)?[a-z_]+(\.[a-z_]+)+: ", line):
            return line
    return lines[0] if lines else message
