"""Where each stage's exported weights live, and what --from_weight / --reward_model name.

A stage exports its consolidated weights to <out_root>/<stage>/export; the next stage's --from_weight names the
stage (or any export directory).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from train.config import ConfigError, TrainConfig

EXPORT_DIR = "export"
STAGE_ORDER = ["pretrain", "midtrain", "sft", "dpo", "reward", "ppo", "grpo"]


def resolve_from_weight(cfg: TrainConfig) -> Optional[Path]:
    """`none`, a stage name (its export under out_root) or a directory; a missing source says what to run."""
    return None if cfg.from_weight == "none" else resolve_weights(cfg, "from_weight", cfg.from_weight)


def resolve_weights(cfg: TrainConfig, option: str, value: str) -> Path:
    """The export directory an option names: a stage name (its export under out_root) or a directory."""
    if value in STAGE_ORDER:
        path = cfg.resolve_path(cfg.out_root) / value / EXPORT_DIR
        if not (path / "model.safetensors").is_file():
            raise ConfigError(f"--{option} {value}: no exported weights at {path}; run the {value} stage first "
                              f"(bash launch/run_{value}.sh, or python train/{value}.py) with the same --out_root")
        return path
    path = cfg.resolve_path(value)
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"--{option} {value}: {path} holds no model.safetensors; give a stage name "
                          f"({', '.join(STAGE_ORDER)}) or a directory written by a stage's export"
                          + ("" if option != "from_weight" else ", or none"))
    return path
