"""A stage's data: the tokenizer, the prepared token store (tokenized once, by one rank per node) and the loaders."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Optional

from data.mixture import DataConfig, load_data_config, one_source_config
from data.prepare import (SPLITS, PreparedData, describe_counts, load_prepared, skipped_records,
                          skipped_records_report)
from data.tokenizer import Tokenizer, load_tokenizer
from model import ModelConfig
from train import distributed
from train.config import ConfigError, TrainConfig


@dataclass
class StageData:
    tokenizer: Tokenizer
    prepared: PreparedData
    train: object  # the stage's loader (Stage.make_loader)
    val: Optional[object]
    mode: str
    seq_len: int

    def describe(self) -> dict:
        return {"store": str(self.prepared.root), "key": self.prepared.key, "kind": self.prepared.kind,
                "mode": self.mode, "seq_len": self.seq_len, "reused_prepared": self.prepared.reused,
                "train_docs": len(self.prepared.split("train")),
                "val_docs": len(self.prepared.split("val")) if self.val else 0,
                "micro_batches_per_epoch_per_rank": len(self.train),
                "padding_fraction": self.train.padding_fraction(0), "tokenizer": self.tokenizer.name_or_path,
                "skipped_records": self.skipped_records}

    @property
    def skipped_records(self) -> dict:
        """Bad records --skip_bad_records left out, per input file."""
        return skipped_records(self.prepared)


def _prepare_on_one_rank_per_node(data_config, tokenizer: Tokenizer, cfg: TrainConfig) -> PreparedData:
    """Local rank 0 tokenizes (or checks the store); the others wait and open it. An error on the preparing
    rank is raised on every rank, so none is left waiting in a collective."""
    options = dict(skip_bad_records=cfg.skip_bad_records, split_special_tokens=cfg.split_special_tokens)
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            load_prepared(data_config, tokenizer, require_existing=cfg.use_prepared, **options)
        except Exception as caught:  # re-raised below on every rank
            error = f"{type(caught).__name__}: {caught}"
    error = next((e for e in distributed.gather_objects(error) if e), None)
    if error:
        raise ConfigError(error)
    return load_prepared(data_config, tokenizer, require_existing=True, **options)


def data_option(config: DataConfig) -> str:
    """How the user named the data: '--data_config FILE' or '--data_path FILE'."""
    return f"{'--data_path' if config.one_source else '--data_config'} {config.config_file}"


def _refuse_unsupervised(prepared: PreparedData, stage_name: str) -> None:
    """SFT and DPO data (the reward model reads DPO data too) supervise only the assistant turns: a train split without
    a supervised token would run to the end with a null loss. Pretrain data is supervised throughout; RL data has no
    targets by design (the policy generates them)."""
    if prepared.kind not in ("sft", "dpo"):
        return
    for split in SPLITS:
        counts = prepared.meta["splits"][split]
        sides = counts if prepared.kind == "dpo" else {"": counts}
        supervised = sum(side["supervised_tokens"] for side in sides.values())
        docs = next(iter(sides.values()))["docs"]
        # An empty val split is no validation. One with documents but no target is refused rather than warned about:
        # every eval/loss of the run would be 0/0, and the fix is one line of the data config.
        if supervised or (split == "val" and not docs):
            continue
        described = "; ".join(f"{side + ': ' if side else ''}{describe_counts(side_counts)}"
                              for side, side_counts in sides.items())
        answers = "conversation" if prepared.kind == "sft" else "chosen and rejected answer"
        remedy = (f"give each {answers} an assistant turn within max_seq_len {prepared.config.max_seq_len}"
                  + (", or leave validation out (validation.fraction 0, no validation.path)" if split == "val" else ""))
        raise ConfigError(f"{data_option(prepared.config)}: the {split} split has no supervised token "
                          f"({described}), nothing for {stage_name} to {'learn' if split == 'train' else 'measure'} "
                          f"(only assistant turns are supervised); {remedy}")


def load_run_tokenizer(cfg: TrainConfig) -> Tokenizer:
    try:
        return load_tokenizer(cfg.resolve_path(cfg.tokenizer))
    except (OSError, ValueError) as error:
        raise ConfigError(f"--tokenizer: {error}") from None


def stage_data_config(cfg: TrainConfig, stage) -> DataConfig:
    """--data_config's mixture, or --data_path's one source (its sequence length from --max_seq_len, else from the
    stage's default mixture, which --data_path replaces), checked against the stage's data kind."""
    if cfg.data_path:
        if not (cfg.max_seq_len or cfg.data_config):
            raise ConfigError(f"--data_path {cfg.data_path}: give --max_seq_len too (no data config to take it from)")
        max_seq_len = cfg.max_seq_len or load_data_config(cfg.resolve_path(cfg.data_config)).max_seq_len
        return one_source_config(cfg.resolve_path(cfg.data_path), stage.data_kind, max_seq_len)
    data_config = load_data_config(cfg.resolve_path(cfg.data_config))
    if data_config.kind != stage.data_kind:
        raise ConfigError(f"--data_config {cfg.data_config}: kind '{data_config.kind}' does not fit the "
                          f"{stage.name} stage, which reads '{stage.data_kind}' data")
    return dataclasses.replace(data_config, max_seq_len=cfg.max_seq_len) if cfg.max_seq_len else data_config


def build_data(cfg: TrainConfig, stage, model_config: ModelConfig, rank: int, world_size: int,
               tokenizer: Optional[Tokenizer] = None) -> StageData:
    """`tokenizer`: --tokenizer's, when the caller has loaded it already."""
    tokenizer = tokenizer or load_run_tokenizer(cfg)
    tokenizer_dir = cfg.resolve_path(cfg.tokenizer)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"--tokenizer {tokenizer_dir}: its vocabulary ({tokenizer.vocab_size}) does not fit the "
                          f"model's vocab_size ({model_config.vocab_size}); use a model with vocab_size >= "
                          f"{tokenizer.vocab_size} or the tokenizer the model was trained with")
    data_config = stage_data_config(cfg, stage)
    seq_len = data_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f"--max_seq_len / {data_option(data_config)}: sequence length {seq_len} exceeds the "
                          f"model's max_seq_len {model_config.max_seq_len}")
    prepared = _prepare_on_one_rank_per_node(data_config, tokenizer, cfg)
    if distributed.is_main():
        for line in skipped_records_report(prepared):
            print(f"WARNING: {line}", file=sys.stderr, flush=True)
    _refuse_unsupervised(prepared, stage.name)
    mode = stage.default_packing if cfg.packing == "auto" else cfg.packing
    train = stage.make_loader(prepared.split("train"), cfg, seq_len, rank, world_size, mode, weights=prepared.weights)
    val_store = prepared.split("val")
    val = None
    if len(val_store):
        # Every validation document once; the last batches are completed with padding rows, not dropped.
        val = stage.make_loader(val_store, cfg, seq_len, rank, world_size, mode, drop_last=False)
    return StageData(tokenizer, prepared, train, val, mode, seq_len)
