"""The entry point of a stage script (`python train/sft.py ...`): the stage's defaults, then --config YAML, then
flags; then the trainer runs the stage. Stage modules import it only when run as a script."""
from __future__ import annotations

from typing import Optional

from train.config import parse_config
from train.stage import Stage
from train.trainer import Trainer


def main(stage: Stage, defaults: dict, argv: Optional[list[str]] = None) -> list[dict]:
    cfg = parse_config({"stage": stage.name, **defaults}, argv, cls=stage.config_class,
                       description=f"zerostage {stage.name} stage")
    return Trainer(stage, cfg).train()
