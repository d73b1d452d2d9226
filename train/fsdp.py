"""The FSDP2 backend (`--backend fsdp`, started with torchrun): PyTorch's `fully_shard`.

Each transformer block is its own shard group and the root holds the rest (embedding, tied LM head, final norm):
parameters, gradients and optimizer state are sharded over the ranks, as under ZeRO-3. The reduce-scatter
averages gradients over ranks, so the objective is scaled by the world size to make that a sum; `step` takes the
norm of the full gradient from the ranks' shards in float64 (`sharded_grad_norm`) and clips with it. Checkpoints are
`torch.distributed.checkpoint` folders (each rank writes its shards), and `full_state_dict` gathers the whole
model on rank 0 for the export.
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
from train.backend import Backend, TrainedModel, Update, restore_peak_learning_rate
from train.config import ConfigError, TrainConfig

ENGINE_STATE = "engine_state.pt"  # scheduler, step counters and the trainer's client state (rank 0)


def shard(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Shard `model` in place over every rank: one group per transformer block, the root for the rest."""
    device = distributed.device()
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    # bf16 compute on bf16 copies of fp32 shards, gradients reduced in fp32: what build_ds_config makes DeepSpeed do.
    # No input casts: the default would round each block's fp32 RoPE cos/sin to bf16, which DeepSpeed keeps fp32;
    # the blocks' hidden states are already bf16 (the embedding's output), the root's inputs are token ids.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    model.to(device)
    for block in [module for module in model.modules() if isinstance(module, Block)]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


class FSDPBackend(Backend):
    name = "fsdp"
    shards_parameters = True
    frozen_forward_is_collective = False  # frozen models stay plain: ranks may run different numbers of forwards

    def __init__(self, cfg: TrainConfig, world_size: int, dtype: str):
        if dtype == "fp16":
            # Refused rather than torch's GradScaler: its skip decision is per rank and unchecked on FSDP2's shards.
            raise ConfigError("--dtype fp16: --backend fsdp has no loss scaler here (fp16 gradients underflow "
                              "without one); use --dtype bf16 or fp32, or --backend deepspeed (dynamic loss scaling)")
        super().__init__(dtype)
        self.world_size, self.grad_clip = world_size, cfg.grad_clip

    def describe(self) -> str:
        return "FSDP2"

    def run_tag(self) -> str:
        return "fsdp"

    def settings(self) -> dict:
        return {"dtype": self.dtype, "gradient_clipping": self.grad_clip, "reduce_dtype": "fp32",
                "sharding": "fully_shard per transformer block + root, resharded after forward"}

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return shard(model, self.torch_dtype)

    def trained(self, model, optimizer, scheduler) -> "FSDPModel":
        return FSDPModel(model, optimizer, scheduler, self.world_size, self.grad_clip)

    def frozen(self, module: torch.nn.Module):
        return module.requires_grad_(False).eval().to(distributed.device(), self.torch_dtype)


class FSDPModel(TrainedModel):
    """A `fully_shard`ed model with its torch optimizer and schedule."""
    grad_norm_source = "float64 norm of the sharded gradients, summed over ranks (sharded_grad_norm)"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler, world_size: int, grad_clip: float):
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.runner = module
        self.world_size, self.grad_clip = world_size, grad_clip
        self.micro_steps = 0  # backward passes, and applied updates: saved with the checkpoint
        self.global_steps = 0

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, objective: torch.Tensor) -> None:
        (objective * self.world_size).backward()  # the reduce-scatter averages over ranks
        self.micro_steps += 1

    def step(self) -> Update:
        """Clip, update, advance the schedule; as DeepSpeed's ZeRO optimizers do, a non-finite norm skips the
        update and the schedule (read on the host, as they read it)."""
        learning_rate = self.learning_rate
        params = [p for p in self.module.parameters() if p.grad is not None]
        grad_norm = sharded_grad_norm([p.grad for p in params])
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, grad_norm.to(torch.float32))
        applied = bool(torch.isfinite(grad_norm))
        if applied:
            self.optimizer.step()
            self.lr_scheduler.step()
            self.global_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return Update(grad_norm, not applied, applied, learning_rate)

    # ----- checkpoints -----
    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        """Collective: the sharded model and optimizer state, plus the schedule and counters (rank 0)."""
        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / tag))
        if distributed.is_main():
            torch.save({"lr_scheduler": self.lr_scheduler.state_dict(), "micro_steps": self.micro_steps,
                        "global_steps": self.global_steps, "client_state": client_state},
                       directory / tag / ENGINE_STATE)

    def load(self, directory: Path, tag: str) -> tuple[bool, Optional[dict]]:
        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(directory / tag))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        engine_state = torch.load(directory / tag / ENGINE_STATE, weights_only=False)
        self.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
        restore_peak_learning_rate(self.lr_scheduler, self.peak_learning_rate)
        self.micro_steps, self.global_steps = engine_state["micro_steps"], engine_state["global_steps"]
        return True, engine_state["client_state"]

    def full_state_dict(self) -> Optional[dict]:
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if distributed.is_main() else None

    @torch.no_grad()
    def copy_weights_to(self, target: torch.nn.Module) -> None:
        targets = dict(target.named_parameters())
        for name, param in self.module.named_parameters():
            targets[name].data.copy_(full_tensor(param.data))


def sharded_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Collective: the global L2 norm of the full gradients, from each rank's shards, accumulated in float64.

    Not `clip_grad_norm_`: its fp32 `vector_norm` on CPU sums squares into a few fp32 accumulators, which round small
    squares away (the tiny model's embedding gradient: 1.6e-4 low whole, 6e-5 as two shards, so 1 and 2 ranks logged
    the same gradient 1e-4 apart). Float64 per shard agrees with the gathered gradient's norm whatever the sharding."""
    squares = torch.zeros((), dtype=torch.float64, device=distributed.device())
    for grad in grads:
        if isinstance(grad, DTensor):
            # Every parameter is fully_shard-ed over all ranks (Shard(0)): each element lies on one rank only, and
            # to_local() is the shard without FSDP's padding.
            assert all(placement.is_shard() for placement in grad.placements), grad.placements
            grad = grad.to_local()
        elif distributed.world_size() > 1:
            raise ValueError("a plain (replicated) gradient would be counted once per rank")
        squares += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    return distributed.sum_over_ranks(squares).sqrt()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded parameter (a collective), or a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
