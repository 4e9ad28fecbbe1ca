"""`lit-sapo`: a LightningCLI over SAPOModule and RolloutDataModule.

    lit-sapo fit --config configs/quickstart.yaml [--config configs/gates/erf.yaml] [--trainer.max_steps 10]

Configs are read in omegaconf mode, so one value can feed several places (`data.tokenizer: ${model.model.name}`).
A bad setting stops the run with one line naming it, before any model is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_sapo.module import SAPOModule
from lit_sapo.rollout import RolloutDataModule


class _DropMessages(logging.Filter):
    """Drops Lightning's start-up lines that say nothing about a rollout run (exact message prefixes only)."""

    PREFIXES = ("GPU available: ", "TPU available: ", "💡 Tip: For seamless cloud logging")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages())
    # Lightning's own pytree helper calls a torch API that torch deprecated; nothing a user can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class OneLineErrorParser(LightningArgumentParser):
    """A parse error is one line, `lit-sapo: error: <setting>: <what>; <fix>` (with 'did you mean' for a typo),
    instead of the usage dump with the useful line at its end."""

    def error(self, message: str, ex: Exception | None = None):
        from jsonargparse._common import debug_mode_active  # noqa: PLC0415 (private, but the same test it uses)

        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        from lit_sapo.cli_checks import error_line, one_line_parse_error

        parser = getattr(ex, "subcommand_parser", None) or self
        keys = [a.dest for a in parser._actions if isinstance(getattr(a, "dest", None), str)]
        print(error_line(one_line_parse_error(message, keys)), file=sys.stderr, flush=True)
        self.exit(2)


class SAPOCLI(LightningCLI):
    def _instantiate_trainer(self, config: dict, callbacks: list):
        # the console: a bar over rollouts (unless the bar is off) and a summary at the end, unless the config has them
        from lit_sapo.callbacks import RolloutProgressBar, RunSummary

        mine = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(
                type(c).__name__.endswith("ProgressBar") for c in mine):
            callbacks = [*callbacks, RolloutProgressBar()]
        if not any(isinstance(c, RunSummary) for c in mine):
            callbacks = [*callbacks, RunSummary()]
        trainer = super()._instantiate_trainer(config, callbacks)
        # checkpoint temp files beside the target, not in $TMPDIR (lit_sapo.checkpoint_io)
        from lit_sapo import checkpoint_io

        checkpoint_io.install(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        # metrics.csv flushed every rollout (Lightning's CSVLogger default is every 100 steps): after a kill, the
        # CSV holds every rollout the checkpoint holds. An explicit value other than Lightning's default is kept.
        from lit_sapo.cli_checks import default_csv_flush

        default_csv_flush(self.config.get(self.subcommand) if self.subcommand else self.config)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path's hyperparameters while parsing: a missing, foreign or truncated file is
        # one line here, not a traceback (or torch's advice to load it with weights_only=False)
        import pickle

        from lit_sapo.cli_checks import check_ckpt_path, error_line

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        try:
            check_ckpt_path(ckpt_path)
            super()._parse_ckpt_path()
        except ValueError as err:
            print(error_line(str(err)), file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(error_line(f"--ckpt_path: {ckpt_path} cannot be loaded ({first[:160]}); give a checkpoint "
                             "written by lit-sapo, e.g. <checkpoints dir>/last.ckpt"), file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def _run_subcommand(self, subcommand: str) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            # Lightning stopped at the next safe point and its ModelCheckpoint (if any) saved on the way out
            from lit_sapo.cli_checks import sigterm_line

            print(sigterm_line(self.trainer), file=sys.stderr, flush=True)
            raise SystemExit(143) from None  # 128 + SIGTERM: a shell or scheduler sees the run did not finish

    def instantiate_classes(self) -> None:
        # settings are checked in the constructors (cheap); turn their ValueError into one line, no traceback
        try:
            super().instantiate_classes()
        except ValueError as err:
            from lit_sapo.cli_checks import own_setting_line

            print(f"lit-sapo: error: {own_setting_line(str(err))}", file=sys.stderr)
            raise SystemExit(2) from None

    def before_fit(self) -> None:
        # settings that need the trainer and the datamodule together (minibatch split, lr schedule length):
        # checked here too, so they stop the run with one line before any model is loaded
        try:
            self.model.bind_run(self.trainer, self.datamodule)
        except ValueError as err:
            print(f"lit-sapo: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None


def main(args: list[str] | None = None, callbacks: list | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI; `callbacks` (Python objects) are added to those of the config, e.g. by benchmarks.

    `run=False`: parse and instantiate only (no subcommand in `args`), as `lit-sapo probe` does."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # without data.val_sources there is deliberately no validation data; Lightning would warn on every fit
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    # ModelCheckpoint(every_n_train_steps) under manual optimization warns that it saves the state AFTER the
    # optimizer steps of the batch: for a rollout step that is the state to resume from, so the advice does not apply
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    # `${model.model.name}` in a config means the same key of the merged config, under any subcommand
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    _quiet_lightning()
    from lit_sapo.cli_checks import check_yaml_files, error_line, join_negative_values

    if args is None:  # the console script: fix sys.argv in place (LightningCLI warns when both are given)
        sys.argv[1:] = join_negative_values(sys.argv[1:])
    elif isinstance(args, list):
        args = join_negative_values(args)
    try:
        check_yaml_files(sys.argv[1:] if args is None else list(args) if isinstance(args, list) else [])
    except ValueError as err:
        print(error_line(str(err)), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return SAPOCLI(
        SAPOModule, RolloutDataModule,
        parser_kwargs={"parser_mode": "omegaconf+"},  # interpolations resolve on the merged config
        # re-running in the same folder must not fail on the config file of the previous run
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        run=run,
        parser_class=OneLineErrorParser,
        auto_configure_optimizers=False,
        # validate/test under FSDP2 + NCCL would run in torch.inference_mode, which FSDP2 unsharding did not support
        # the model summary lists internal metric modules: off unless asked for
        trainer_defaults={"inference_mode": False, "enable_model_summary": False, **({"callbacks": list(callbacks)} if callbacks else {})},
    )


# Commands beside LightningCLI's fit/validate/test/predict: name -> module with `main(argv) -> int`.
# Each is imported only when called, so `lit-sapo fit` pays for none of them.
TOOLS = {
    "sweep": "lit_sapo.study.sweep",
    "plot": "lit_sapo.study.plot_cli",
    "eval": "lit_sapo.evaluate",
    "probe": "lit_sapo.study.probe",
}


def run() -> None:
    """The `lit-sapo` console script: exit status 0 on success (`sys.exit(main())` would print the CLI object
    and exit 1, which SLURM and shell scripts read as a failure)."""
    argv = sys.argv[1:]
    if argv and argv[0] in TOOLS:
        import importlib

        raise SystemExit(importlib.import_module(TOOLS[argv[0]]).main(argv[1:]) or 0)
    main()


if __name__ == "__main__":
    run()
