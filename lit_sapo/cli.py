"""`lit-sapo`: a LightningCLI over SAPOModule and RolloutDataModule.

    lit-sapo fit --config configs/quickstart.yaml [--config configs/gates/erf.yaml] [--trainer.max_steps 10]

Configs are read in omegaconf mode, so one value can feed several places (`${model.model.name}`).
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from lit_sapo.module import SAPOModule
from lit_sapo.rollout import RolloutDataModule


def main(args: list[str] | None = None) -> LightningCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return LightningCLI(
        SAPOModule, RolloutDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        # re-running in the same folder must not fail on the config file of the previous run
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
