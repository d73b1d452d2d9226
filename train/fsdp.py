"""The FSDP2 backend (`--backend fsdp`): PyTorch's `fully_shard`, behind the small part of DeepSpeed's engine
interface that the trainer and the stages use, so the loop stays backend-agnostic.

Each transformer block is its own shard group and the root holds the rest (embedding, tied LM head, final norm):
parameters, gradients and optimizer state are sharded over the ranks, as under ZeRO-3. The conventions are
DeepSpeed's, so a run matches a ZeRO run of the same seed: `backward` divides the loss by the accumulation steps
and the reduce-scatter averages over ranks (the trainer's `loss_scale` undoes both); at the accumulation boundary
`step` clips with `clip_grad_norm_` on the sharded gradients, whose result is the norm of the full gradient,
and keeps that pre-clip norm for `get_global_grad_norm`. Checkpoints are `torch.distributed.checkpoint` folders
(each rank writes its shards), and `full_state_dict` gathers the whole model on rank 0 for the export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model.model import Block
from train import distributed

ENGINE_STATE = "engine_state.pt"  # scheduler, step counters and the trainer's client state (rank 0)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def shard(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Shard `model` in place over every rank: one group per transformer block, the root for the rest."""
    device = distributed.device()
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    # bf16 compute on bf16 copies of fp32 shards, gradients reduced in fp32: what DeepSpeed's bf16 mode does.
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
    model.to(device)
    for block in [module for module in model.modules() if isinstance(module, Block)]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


class FSDPEngine:
    """What the trainer calls on a DeepSpeed engine, for a `fully_shard`ed model and its torch optimizer."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler, accumulation_steps: int, grad_clip: float):
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.accumulation_steps, self.grad_clip = accumulation_steps, grad_clip
        self.micro_steps = 0
        self.global_steps = 0
        self._grad_norm: Optional[torch.Tensor] = None
        self._applied = True

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def step(self) -> None:
        """At the accumulation boundary: clip, update, advance the schedule; elsewhere only count the micro-step."""
        if self.is_gradient_accumulation_boundary():
            params = [p for p in self.module.parameters() if p.grad is not None]
            if self.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            self._grad_norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).to(torch.float64)
            # As DeepSpeed's ZeRO optimizers do, a non-finite norm skips the update and the schedule (read on the
            # host, as they read it).
            self._applied = bool(torch.isfinite(self._grad_norm))
            if self._applied:
                self.optimizer.step()
                self.lr_scheduler.step()
                self.global_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self) -> Optional[torch.Tensor]:
        """The pre-clip norm of the full gradient at the last boundary (None before the first)."""
        return self._grad_norm

    def was_step_applied(self) -> bool:
        return self._applied

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    # ----- checkpoints -----
    def save(self, directory: Path, client_state: Optional[dict]) -> None:
        """Collective: the sharded model and optimizer state, plus the engine's own state (rank 0)."""
        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
        if distributed.is_main():
            torch.save({"lr_scheduler": self.lr_scheduler.state_dict(), "micro_steps": self.micro_steps,
                        "global_steps": self.global_steps, "client_state": client_state}, directory / ENGINE_STATE)

    def load(self, directory: Path) -> Optional[dict]:
        """Collective: restore what `save` wrote; returns its client state."""
        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        engine_state = torch.load(directory / ENGINE_STATE, weights_only=False)
        self.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
        self.micro_steps, self.global_steps = engine_state["micro_steps"], engine_state["global_steps"]
        return engine_state["client_state"]

    def full_state_dict(self) -> Optional[dict]:
        """Collective: the whole model's weights on rank 0's CPU (None on the other ranks)."""
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if distributed.is_main() else None


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded parameter (a collective), or a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
