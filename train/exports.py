"""Where each stage's exported weights live, and what --from_weight / --reward_model name.

A stage exports its consolidated weights to <out_root>/<stage>/export; the next stage's --from_weight names the
stage (or any export directory). Beside the weights, zerostage.json records where they came from, the tokenizer
above all: weights trained with one tokenizer read another's ids as other words, so starting from them with
another tokenizer is refused unless asked for. A language model's export also holds hf/, the same weights in
Hugging Face transformers' format with the tokenizer (model/hf.py); --from_weight also reads a transformers
directory (Llama, Qwen2, Qwen3, ...) and a MiniMind .pth state dict.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from data.tokenizer import BUILT_IN_CHATML, Tokenizer
from model import ModelConfig, save_state_dict
from model.hf import INDEX_FILE, WEIGHTS_FILE, hf_model_type, save_hf, special_token_ids
from train import distributed
from train.config import ConfigError, TrainConfig

EXPORT_DIR = "export"
HF_EXPORT_DIR = "hf"
PROVENANCE = "zerostage.json"
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
    if option == "from_weight" and (path.suffix == ".pth" and path.is_file() or (path / INDEX_FILE).is_file()):
        return path
    if not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"--{option} {value}: {path} holds no model.safetensors; give a stage name "
                          f"({', '.join(STAGE_ORDER)}) or a directory written by a stage's export"
                          + ("" if option != "from_weight" else ", a Hugging Face model directory (safetensors), "
                                                                 "a MiniMind .pth file, or none"))
    return path


def export_language_model(state_dict: dict, config: ModelConfig, directory: Path, tokenizer) -> Path:
    """zerostage's export (what --from_weight reads) and beside it, in hf/, the same weights in transformers' format
    with the tokenizer's files; a model no standard architecture computes gets a warning instead of hf/."""
    save_state_dict(state_dict, config, directory)
    try:
        hf_model_type(config)
    except ValueError as error:
        print(f"WARNING: no Hugging Face export in {directory / HF_EXPORT_DIR}: {error}", file=sys.stderr, flush=True)
        return directory
    save_hf(state_dict, config, directory / HF_EXPORT_DIR, **hf_tokenizer_args(tokenizer))
    return directory


def hf_tokenizer_args(tokenizer: Tokenizer) -> dict:
    """save_hf's tokenizer arguments: the directory whose files are copied, the bos/eos/pad ids, and the chat template
    when the directory holds none (the built-in ChatML the conversations were rendered with)."""
    built_in = tokenizer.chat_template_source == BUILT_IN_CHATML
    return dict(tokenizer_dir=tokenizer.name_or_path, special_ids=special_token_ids(tokenizer),
                chat_template=tokenizer.chat_template if built_in else None)


def write_provenance(directory: Path, stage: str, global_step: int, tokenizer) -> None:
    (directory / PROVENANCE).write_text(json.dumps({
        "stage": stage, "global_step": global_step,
        "tokenizer": {"path": tokenizer.name_or_path, "sha256": tokenizer.fingerprint}}, indent=2) + "\n")


def check_tokenizer(cfg: TrainConfig, option: str, source: Path, tokenizer) -> None:
    """Refuse weights at `source` (named by --option) that were trained with another tokenizer than this run's."""
    path = source / PROVENANCE
    if not path.is_file():
        if distributed.is_main():
            print(f"WARNING: --{option} {source} does not record the tokenizer it was trained with (no {PROVENANCE}): "
                  f"not checked against --tokenizer {tokenizer.name_or_path}", file=sys.stderr, flush=True)
        return
    trained_with = json.loads(path.read_text())["tokenizer"]
    if trained_with["sha256"] == tokenizer.fingerprint or cfg.allow_tokenizer_change:
        return
    raise ConfigError(f"--{option} {source} was trained with the tokenizer {trained_with['path']} (tokenizer.json "
                      f"sha256 {trained_with['sha256'][:12]}…), and this run's --tokenizer {tokenizer.name_or_path} is "
                      f"another (sha256 {tokenizer.fingerprint[:12]}…): the weights would read its ids as other "
                      f"words. Use --tokenizer {trained_with['path']}, or --allow_tokenizer_change true to start "
                      f"from these weights anyway (e.g. a tokenizer extended with new tokens)")
