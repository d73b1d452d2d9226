"""The entry point of a stage script (`python train/sft.py ...`): the stage's defaults, then --config YAML, then
flags; then the trainer runs the stage. Stage modules import it only when run as a script.

A configuration the run cannot honour ends it with one line on rank 0 (every rank raises the same ConfigError)
and exit status 2, as argparse does for a bad flag; anything else keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from train import distributed
from train.config import ConfigError, parse_config
from train.stage import Stage
from train.trainer import Trainer

CONFIG_ERROR_EXIT_CODE = 2


def main(stage: Stage, defaults: dict, argv: Optional[list[str]] = None) -> list[dict]:
    try:
        cfg = parse_config({"stage": stage.name, **defaults}, argv, cls=stage.config_class,
                           description=f"zerostage {stage.name} stage")
        records = Trainer(stage, cfg).train()
        distributed.shutdown()
        return records
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # the same on every rank, maybe before the process group exists
            print(f"ERROR: {error}", file=sys.stderr, flush=True)
        sys.exit(CONFIG_ERROR_EXIT_CODE)
