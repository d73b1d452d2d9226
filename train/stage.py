"""What a stage is: its data, its model, its loss, its FLOPs and its extra metrics. The trainer (train/trainer.py)
calls a stage; a stage never calls the trainer. It receives a StageContext once (config, device, tokenizer, its
trained model and the backend that makes any other model it needs), then per step the step's micro-batches and
the Updater, the only way weights change; it returns what it computed as a StepReport for the metrics.

The language-model stage here serves pretrain, midtrain and SFT, which differ only by configuration;
PairedStage is what DPO and the reward model share.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from data.loader import IGNORE_INDEX, BatchLoader
from data.tokenizer import Tokenizer
from model import ModelConfig, Transformer, forward_flops
from model.flops import recomputed_flops
from model.attention import Documents
from model.hf import load_language_model
from train.backend import Backend, TrainedModel, Update, unwrap
from train.config import ConfigError, TrainConfig
from train.exports import export_language_model
from train.metrics import BatchStats
from train.updater import LossOutput, Updater, host_to_device


@dataclass
class StageContext:
    """What a stage works with, made by the trainer once the trained model exists."""
    cfg: TrainConfig
    device: torch.device
    tokenizer: Tokenizer
    model: TrainedModel  # the model the stage trains (the policy of RL stages)
    backend: Backend  # makes the stage's other models: frozen references, reward models, a critic
    total_steps: int  # global steps of the run (sizes another trained model's schedule)

    @property
    def model_config(self) -> ModelConfig:
        return self.model.module.config


@dataclass
class MicroBatchReport:
    """What a stage computed on one micro-batch (or one rollout), as the metrics count it."""
    loss_sum: torch.Tensor  # device, over the loss units
    loss_units: float  # tokens, pairs, ... the loss sum is over
    stats: Optional[BatchStats]  # None when metrics are off
    aux_loss: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)  # metric name -> (device sum, host count)


@dataclass
class StepReport:
    micro_batches: list[MicroBatchReport]
    update: Update  # the trained model's last update of the step
    phases: list = field(default_factory=list)  # metrics.Phase: the step's timed parts and their work
    last_values: dict = field(default_factory=dict)  # metric name -> its value at this step (None: unknown)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on the device, with "documents": where its documents lie, worked out on the host while the batch
    is still there, so that the attention kernels never read document ids back (model.attention.Documents)."""
    documents = {"documents": Documents(batch["doc_ids"])} if "doc_ids" in batch else {}
    return {k: host_to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} | documents


def document_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of every document segment in a [B, T] doc-id tensor (padding, -1, left out)."""
    rows = torch.arange(doc_ids.shape[0]).unsqueeze(1) * (doc_ids.shape[1] + 1)
    keys = (doc_ids + rows)[doc_ids >= 0]  # unique per (row, doc), in order
    return torch.unique_consecutive(keys, return_counts=True)[1]


def drop_padding_columns(batch: dict) -> dict:
    """The [rows, T] batch cut to its widest row: the loader pads every row to max_seq_len, and the columns that are
    padding in every row would cost a full forward and backward for nothing."""
    used = (batch["doc_ids"] >= 0).any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return {name: value[:, :width] for name, value in batch.items()}


def requested_model_config(cfg: TrainConfig) -> ModelConfig:
    """The model --model names: a preset, or a directory holding config.json."""
    config_file = cfg.resolve_path(cfg.model) / "config.json"
    if not config_file.is_file():
        try:
            return ModelConfig.from_preset(cfg.model)
        except ValueError as error:
            raise ConfigError(f"--model: {error} (or a directory holding config.json)") from None
    try:
        values = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError too: it gives the byte position
        raise ConfigError(f"--model: {config_file} is not valid UTF-8 JSON: {error}") from None
    try:
        return ModelConfig.from_dict(values, str(config_file))
    except ValueError as error:
        raise ConfigError(f"--model: {error}") from None


def build_language_model(cfg: TrainConfig, source: Optional[Path]) -> Transformer:
    """The weights at `source` (an export, a transformers directory, a MiniMind .pth), else a fresh model of the
    --model preset or config directory. A --model given together with --from_weight must be the model the weights
    are: it is never silently ignored (a .pth without a config.json beside it takes its config from --model)."""
    if source is None:
        return Transformer(requested_model_config(cfg))
    given = requested_model_config(cfg) if "model" in cfg.explicit_options else None
    try:
        model = load_language_model(source, given)
    except ValueError as error:  # each names the file: its config, its weights
        raise ConfigError(f"--from_weight: {error}") from None
    if "model" in cfg.explicit_options:
        requested, loaded = requested_model_config(cfg).to_dict(), model.config.to_dict()
        different = [f"{key} {requested[key]} (the weights: {loaded[key]})" for key in requested
                     if requested[key] != loaded[key]]
        if different:
            raise ConfigError(f"--model {cfg.model} is not the model --from_weight {source} holds: "
                              f"{', '.join(different)}; leave --model out to train the model the weights are, or "
                              f"--from_weight none to train a fresh {cfg.model}")
    return model


class Stage:
    """Interface every stage implements; see LanguageModelStage for the reference one."""
    name: str = "stage"
    data_kind: str = "pretrain"
    default_packing: str = "padded"
    config_class: type[TrainConfig] = TrainConfig  # a subclass adds the stage's own flags
    loss_unit: str = "token"  # what train/loss and eval/loss average over; perplexity only means something per token
    generates: bool = False  # its steps decode (RL rollouts): the device's memory bandwidth is measured for MBU
    loss_chunk_tokens: int = 0  # --loss_chunk_tokens, from setup: the positions whose logits exist at once (0: all)
    ctx: StageContext

    def make_loader(self, store, cfg: TrainConfig, seq_len: int, rank: int, world_size: int, mode: str,
                    weights=None, drop_last: bool = True):
        """The loader of micro-batches of cfg.batch_size rows (train split: weighted; validation: every row once)."""
        return BatchLoader(store, cfg.batch_size, seq_len, rank, world_size, cfg.seed, mode, weights=weights,
                           drop_last=drop_last)

    def optimizer_steps_per_step(self, cfg: TrainConfig) -> int:
        """Optimizer steps one global step takes at most (sizes the learning-rate schedule)."""
        return 1

    def build_model(self, cfg: TrainConfig, source: Optional[Path]) -> torch.nn.Module:
        """The model to train (exposing `.config`), from --from_weight's export or fresh."""
        return build_language_model(cfg, source)

    def setup(self, ctx: StageContext) -> None:
        """Called once the trained model exists and before a resume loads a checkpoint (extra models are made
        here, from the initial weights)."""
        self.ctx = ctx
        self.loss_chunk_tokens = ctx.cfg.loss_chunk_tokens

    def trained_models(self) -> dict[str, TrainedModel]:
        """Trained models besides ctx.model (name -> model), saved and resumed with its checkpoints."""
        return {}

    def prepare_batch(self, batch: dict) -> dict:
        """The CPU micro-batch as the stage reads it, before it is counted and moved to the device."""
        return batch

    def train_step(self, micro_batches: list[dict], updater: Updater) -> StepReport:
        """One global step over the step's prepared micro-batches: by default one update of `loss`."""
        units = [self.loss_weight(batch) for batch in micro_batches]
        normaliser = updater.normaliser(sum(units))
        outputs, update = updater.update(self.ctx.model, micro_batches, self._device_loss, normaliser)
        counted = self.ctx.cfg.metrics  # with metrics off, not even the host counts
        return StepReport([MicroBatchReport(output.loss_sum, weight, self.counted_stats(batch) if counted else None,
                                            output.aux_loss, output.extras)
                           for batch, weight, output in zip(micro_batches, units, outputs)], update)

    def _device_loss(self, model: TrainedModel, batch: dict) -> LossOutput:
        return self.loss(model, to_device(batch, self.ctx.device))

    def begin_evaluation(self, global_step: int) -> None:
        """Before an evaluation's batches (RL: refresh the generating copy, seed the sampler)."""

    def evaluate_batch(self, batch: dict) -> dict:
        """One validation batch's sums: name -> (sum, count); eval/<name> is their global ratio. Every rank must
        return the same names. By default the stage's loss (and its extras) over the loss units."""
        batch = self.prepare_batch(batch)
        output = self._device_loss(self.ctx.model, batch)
        return {"loss": (output.loss_sum, self.loss_weight(batch)), **output.extras}

    def export(self, state_dict: dict, model_config: ModelConfig, directory: Path) -> Path:
        """Write the consolidated weights where the next stage's --from_weight finds them (and hf/ beside them)."""
        return export_language_model(state_dict, model_config, directory, self.ctx.tokenizer)

    def loss_weight(self, batch: dict) -> int:
        """The micro-batch's count of loss units, known before the forward (the step's normaliser)."""
        raise NotImplementedError

    def batch_stats(self, batch: dict, model_config: ModelConfig) -> BatchStats:
        raise NotImplementedError

    def recomputed_flops(self, batch: dict, model_config: ModelConfig) -> float:
        """Forward FLOPs the training step runs again in its backward under this run's options (hardware FLOPs
        less model FLOPs): --activation_checkpointing, --loss_chunk_tokens."""
        return 0.0

    def counted_stats(self, batch: dict) -> BatchStats:
        stats = self.batch_stats(batch, self.ctx.model_config)
        stats.recomputed_flops = self.recomputed_flops(batch, self.ctx.model_config)
        return stats

    def loss(self, model: TrainedModel, batch: dict) -> LossOutput:
        raise NotImplementedError


class LanguageModelStage(Stage):
    """Next-token cross-entropy over the supervised tokens (all text tokens for pretrain, assistant turns for SFT)."""
    data_kind = "pretrain"

    def __init__(self, name: str, data_kind: str, default_packing: str):
        self.name = name
        self.data_kind = data_kind
        self.default_packing = default_packing

    def prepare_batch(self, batch: dict) -> dict:
        return drop_padding_columns(batch)

    def loss_weight(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def batch_stats(self, batch: dict, model_config: ModelConfig) -> BatchStats:
        lengths = document_lengths(batch["doc_ids"])
        return BatchStats(
            computed_tokens=batch["input_ids"].numel(),
            input_tokens=int(lengths.sum()),
            supervised_tokens=self.loss_weight(batch),
            samples=int(batch["input_ids"].shape[0]),
            model_flops=3.0 * forward_flops(model_config, lengths),  # backward = 2 × forward
        )

    def recomputed_flops(self, batch: dict, model_config: ModelConfig) -> float:
        cfg = self.ctx.cfg
        head_tokens = batch["input_ids"].numel() if cfg.loss_chunk_tokens else 0  # the head runs on every position
        return float(recomputed_flops(model_config, document_lengths(batch["doc_ids"]), cfg.activation_checkpointing,
                                      head_tokens))

    def loss(self, model: TrainedModel, batch: dict) -> LossOutput:
        output = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"],
                       return_hidden=True, documents=batch.get("documents"))
        logps, _ = unwrap(model).label_logps(output.hidden.flatten(0, 1), batch["labels"].flatten(),
                                             self.loss_chunk_tokens)
        return LossOutput(loss_sum=-logps.sum(), aux_loss=output.aux_loss)


class PairedStage(Stage):
    """Preference pairs in either loader layout (data/loader.py): padded, [2B, T] rows, the B chosen answers then the
    B rejected answers of the same pairs; packed, B rows of whole pairs (--batch_size counts rows, not pairs), with
    sequence_ids saying which answer each token belongs to.

    prepare_batch brings both to the form the losses reduce over, the batch's P pairs as 2P answers ordered like the
    padded rows: sequence_ids (padded: the row) and real_pairs, [P] bool (evaluation completes its last padded batch
    with all-padding pairs; a packed batch holds none). It also drops the padding columns every row has (the demo's
    pairs fill a tenth of max_seq_len) and notes the number of real pairs.
    """
    data_kind = "dpo"
    default_packing = "padded"
    loss_unit = "pair"

    def prepare_batch(self, batch: dict) -> dict:
        batch = drop_padding_columns(batch)
        doc_ids = batch["doc_ids"]
        if "sequence_ids" in batch:
            pairs = (int(batch["sequence_ids"].max()) + 1) // 2
            batch["real_pairs"] = torch.ones(pairs, dtype=torch.bool)
        else:
            rows = doc_ids.shape[0]
            batch["sequence_ids"] = torch.where(doc_ids >= 0, torch.arange(rows)[:, None], -1)
            batch["real_pairs"] = doc_ids[: rows // 2, 0] >= 0
        batch["pairs"] = int(batch["real_pairs"].sum())
        return batch

    def loss_weight(self, batch: dict) -> int:
        return batch["pairs"]

