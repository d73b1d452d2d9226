"""The parallel backend: what turns a model into a trained model on every rank, behind one interface.

    backend = build_backend(cfg, world_size)       # DeepSpeedBackend (train/deepspeed_backend.py) or FSDPBackend
    model = backend.wrap(module, cfg, total_steps)  # a TrainedModel: forward, backward, step, save/load
    model.backward(objective)                       # this rank's share of the step's objective, per micro-batch
    update = model.step()                           # Update: pre-clip grad norm, whether it was applied

The objective's convention is the plain one: the step's loss is the sum of every rank's objectives over its
micro-batches, so each backend turns it into the sum of the ranks' gradients in its own way. Both share the AdamW
decay groups and the learning-rate schedule defined here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from train.activation_checkpointing import checkpoint_blocks
from train.compile import compile_blocks
from train.config import TrainConfig
from train.nonfinite import Flag


@dataclass
class Update:
    """What one optimizer step did."""
    grad_norm: Optional[torch.Tensor]  # pre-clip global norm of the full gradient (None: unknown)
    held_back: Flag  # the update was not applied (a device bool where the device decided, without a host sync)
    applied: bool  # the update was applied, as the host knows it (a device-side hold-back is not reflected here)
    learning_rate: float  # the rate the update used


class TrainedModel:
    """A model being trained on this rank: `module` is the whole model's structure (its parameters may be shards)."""
    module: torch.nn.Module
    runner: object  # what forwards and train/eval go through: the DeepSpeed engine (its hooks), else the module
    grad_norm_source: str  # where Update.grad_norm comes from, for run_config.json
    peak_learning_rate: float  # this run's --learning_rate: a resumed schedule takes it over the checkpoint's

    def __call__(self, *args, **kwargs):
        return self.runner(*args, **kwargs)

    def train(self) -> None:
        self.runner.train()

    def eval(self) -> None:
        self.runner.eval()

    @property
    def learning_rate(self) -> float:
        """The rate the next update uses."""
        raise NotImplementedError

    def backward(self, objective: torch.Tensor) -> None:
        """Accumulate the gradient of this rank's share of the step's objective (one micro-batch)."""
        raise NotImplementedError

    def step(self) -> Update:
        """After the step's last micro-batch: reduce, clip and apply the gradients (skipped when not finite)."""
        raise NotImplementedError

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        """Collective: this model's state in directory/tag."""
        raise NotImplementedError

    def load(self, directory: Path, tag: str) -> tuple[bool, Optional[dict]]:
        """Collective: (loaded?, client state) from directory/tag."""
        raise NotImplementedError

    def full_state_dict(self) -> Optional[dict]:
        """Collective where the weights are sharded: the whole model's weights on rank 0's CPU (None elsewhere)."""
        raise NotImplementedError

    def copy_weights_to(self, target: torch.nn.Module) -> None:
        """Collective where the weights are sharded: the full current weights into a plain module of the same
        shape, one parameter at a time (a rank never holds more than its shards plus the largest tensor)."""
        raise NotImplementedError


class Backend:
    """Builds trained and frozen models for one run's parallel configuration."""
    name: str  # as --backend says
    shards_parameters: bool  # each rank holds only shards of the weights (ZeRO-3, FSDP)
    frozen_forward_is_collective: bool  # a frozen model's forward needs every rank (ZeRO-3's partitioned engine)

    def __init__(self, dtype: str):
        self.dtype = dtype  # the training precision: bf16, fp16 or fp32

    @property
    def torch_dtype(self) -> torch.dtype:
        """What the forward computes in, and what replicas (frozen models, samplers) are held in."""
        return TORCH_DTYPES[self.dtype]

    def describe(self) -> str:
        """One phrase for the start-up line: ZeRO-2, FSDP2, ..."""
        raise NotImplementedError

    def run_tag(self) -> str:
        """The backend in a run name (zero2, fsdp)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """Its own settings, as run_config.json records them under the backend's name."""
        raise NotImplementedError

    def run_config(self) -> dict:
        """The backend's entries in run_config.json."""
        return {"backend": self.name, self.name: self.settings()}

    def wrap(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> TrainedModel:
        """`model` trained with AdamW and the warm-up + cosine schedule over `total_steps` optimizer steps."""
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)  # first: --compile compiles the checkpointed forward, as torchtitan orders them
        if cfg.compile:
            compile_blocks(model)
        model = self.prepare(model)  # sharded before the optimizer, which must hold the sharded parameters
        optimizer = self.optimizer(parameter_groups(model, cfg.weight_decay), cfg)
        warmup = int(cfg.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.min_lr_ratio))
        trained = self.trained(model, optimizer, scheduler)
        trained.peak_learning_rate = cfg.learning_rate
        return trained

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def optimizer(self, groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
        return adamw(groups, cfg, fused=torch.cuda.is_available())

    def trained(self, model, optimizer, scheduler) -> TrainedModel:
        raise NotImplementedError

    def frozen(self, module: torch.nn.Module):
        """A model that is only run forward (reference, reward model), in inference mode, in the training dtype:
        an fp32 reference beside a bf16 policy would double its memory and make step 0's DPO margins and PPO KL
        rounding noise instead of 0."""
        raise NotImplementedError

    def frozen_copy(self, model: TrainedModel):
        """A never-trained copy of `model` with its current weights, frozen (in the training dtype)."""
        replica = type(model.module)(model.module.config)
        model.copy_weights_to(replica)
        return self.frozen(replica)


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_backend(cfg: TrainConfig, world_size: int) -> Backend:
    """The run's backend; an option this machine cannot honour fails here, before any model or data is made."""
    dtype = resolve_dtype(cfg.dtype, cfg.backend)
    if cfg.backend == "fsdp":
        from train.fsdp import FSDPBackend

        return FSDPBackend(cfg, world_size, dtype)
    from train.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(cfg, world_size, dtype)


def resolve_dtype(requested: str, backend: str) -> str:
    """--dtype auto: bf16 on a GPU that computes it natively (Ampere and newer); fp16 on older GPUs under DeepSpeed
    (its dynamic loss scale), fp32 there under FSDP (no loss scaler); fp32 on CPU."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "fp32"
    # Without including_emulation=False, V100 and T4 answer True: they emulate bf16, several times slower than fp16.
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp16" if backend == "deepspeed" else "fp32"


def adamw(groups: list[dict], cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """torch's AdamW with the run's rate and betas: the fused kernel, or the multi-tensor one."""
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused,
                             foreach=not fused)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms and biases (1-D) are left alone, as in GPT-2/nanoGPT."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Multiplier of the peak LR for the update with index `step` (0-based): linear warm-up, cosine to a floor."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


def restore_peak_learning_rate(scheduler: torch.optim.lr_scheduler.LambdaLR, peak: float) -> None:
    """After a resume loaded the schedule: keep its position, but with this run's peak rate (a changed
    --learning_rate is one of the options a resume may change); unchanged, the rates are the saved ones exactly."""
    scheduler.base_lrs = [peak for _ in scheduler.base_lrs]
    for group, multiplier in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = peak * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def unwrap(model) -> torch.nn.Module:
    """The module behind a trained model or a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def local_numel(model) -> int:
    """Parameter elements this rank holds: its shards under ZeRO-3 or FSDP, everything otherwise."""
    def held(p) -> int:
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel()
        return p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return sum(held(p) for p in unwrap(model).parameters())
