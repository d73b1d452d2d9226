"""Engine set-up for either backend: DeepSpeed (the ZeRO config filled from the run's flags) or FSDP2
(train/fsdp.py), with the same AdamW decay groups and LR schedule.

`ds_configs/*.json` hold only ZeRO/offload choices; batch sizes, clipping and precision come from the run
config so they cannot disagree with what the loop does. Under `--backend fsdp` the same fields make up the
run's parallel config (`"backend": "fsdp"`), which is what the rest of the code receives in place of a
DeepSpeed config.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Optional

import torch

from train.compile import compile_blocks
from train.config import ConfigError, TrainConfig
from train.fsdp import FSDPEngine, full_tensor, shard

_AUTO = "auto"
FSDP = "fsdp"


def resolve_dtype(requested: str) -> str:
    if requested != "auto":
        if requested in ("bf16", "fp16") and not torch.cuda.is_available():
            raise ConfigError(f"--dtype {requested}: only fp32 trains on CPU here (DeepSpeed's CPU path has no "
                              f"mixed-precision optimizer); valid choices on this machine: auto, fp32")
        return requested
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_ds_config(path: Path) -> dict:
    if not path.is_file():
        choices = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise ConfigError(f"--deepspeed: {path} does not exist" + (f"; choices: {', '.join(choices)}" if choices else ""))
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"--deepspeed: {path} is not valid JSON: {error}") from None


def _fill(config: dict, key: str, value, source: str, option: str) -> None:
    """Set an "auto" (or absent) value; an explicit one must agree with the run's flags."""
    current = config.get(key, _AUTO)
    if current == _AUTO:
        config[key] = value
    elif current != value:
        raise ConfigError(f"{source}: '{key}' is {current} but {option} gives {value}; set it to \"auto\" "
                          f"or make them agree")


def is_fsdp(ds_config: dict) -> bool:
    return ds_config.get("backend") == FSDP


def build_fsdp_config(cfg: TrainConfig, world_size: int, dtype: str) -> dict:
    if dtype == "fp16":
        raise ConfigError("--dtype fp16: --backend fsdp has no loss scaler here; use --dtype bf16 or fp32, "
                          "or --backend deepspeed")
    return {"backend": FSDP, "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": cfg.accumulation_steps,
            "train_batch_size": cfg.batch_size * cfg.accumulation_steps * world_size,
            "gradient_clipping": cfg.grad_clip, "dtype": dtype,
            "sharding": "fully_shard per transformer block + root, resharded after forward"}


def build_ds_config(cfg: TrainConfig, world_size: int, dtype: str) -> dict:
    """The run's parallel config: DeepSpeed's, or under --backend fsdp the FSDP2 equivalent."""
    if cfg.backend == FSDP:
        return build_fsdp_config(cfg, world_size, dtype)
    path = cfg.resolve_path(cfg.deepspeed)
    ds = copy.deepcopy(load_ds_config(path))
    src = str(path)
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.batch_size, src, "--batch_size")
    _fill(ds, "gradient_accumulation_steps", cfg.accumulation_steps, src, "--accumulation_steps")
    global_batch = cfg.batch_size * cfg.accumulation_steps * world_size
    _fill(ds, "train_batch_size", global_batch, src,
          f"--batch_size {cfg.batch_size} × --accumulation_steps {cfg.accumulation_steps} × world size {world_size}")
    # Always explicit: DeepSpeed's own default changed from 0 to 1.0 in v0.19.4.
    _fill(ds, "gradient_clipping", cfg.grad_clip, src, "--grad_clip")
    for key, enabled in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        section = ds.setdefault(key, {})
        _fill(section, "enabled", enabled, src, f"--dtype {dtype}")
    ds.setdefault("steps_per_print", 10**12)  # our own metric lines replace DeepSpeed's
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if "offload_param" in zero and stage != 3:
        raise ConfigError(f"{src}: offload_param needs ZeRO stage 3 (this config is stage {stage})")
    if "offload_optimizer" in zero and stage == 0:
        raise ConfigError(f"{src}: offload_optimizer needs ZeRO stage 1, 2 or 3")
    for section in ("offload_param", "offload_optimizer"):
        if section in zero:
            check_offload_target(zero[section], src, f"zero_optimization.{section}")
    if cfg.compile and stage == 3:
        # Measured: 83 traces in 4 steps of the tiny model, then DeepSpeed's hooks hit the recompile limit.
        raise ConfigError(f"--compile: not supported under ZeRO-3 ({src}): ZeRO-3 gathers parameters with hooks on "
                          f"every submodule, inside the compiled block, which break its graph into dozens of "
                          f"retraced pieces. Use --compile with --deepspeed ds_configs/zero2.json (or zero0, zero1, "
                          f"zero2_offload) or --backend fsdp, or keep ZeRO-3 with --compile false")
    return ds


OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def check_offload_target(offload: dict, src: str, key: str) -> None:
    """An offload target this machine cannot serve fails here, before any work, naming the option; DeepSpeed
    would fail late (nvme_path) or deep inside an op build (async_io)."""
    device = offload.get("device", "none")
    if device not in OFFLOAD_DEVICES:
        raise ConfigError(f"{src}: {key}.device is {device!r}; valid choices: {', '.join(OFFLOAD_DEVICES)}")
    if device != "nvme":
        return
    path = offload.get("nvme_path")
    if not path:
        raise ConfigError(f"{src}: {key}.device is 'nvme' but {key}.nvme_path is not set; give a directory on a "
                          f"local NVMe drive, or use device cpu or none")
    if not Path(path).is_dir():
        raise ConfigError(f"{src}: {key}.nvme_path {path} is not an existing directory")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise ConfigError(f"{src}: {key}.device 'nvme' needs DeepSpeed's async_io op (libaio), which cannot be built "
                          f"on this machine; valid choices here: none, cpu")


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage; 3 under FSDP, which shards what ZeRO-3 partitions (parameters, gradients, optimizer)."""
    if is_fsdp(ds_config):
        return 3
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def describe_backend(ds_config: dict) -> str:
    return "FSDP2" if is_fsdp(ds_config) else f"ZeRO-{zero_stage(ds_config)}"


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms and biases (1-D) are left alone, as in GPT-2/nanoGPT."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=betas, adamw_mode=True)
    # ZeRO-0 fp32 steps this optimizer itself: the fused kernel lets the trainer skip a non-finite update on the
    # device (found_inf), which DeepSpeed's ZeRO 1-3 optimizers do themselves.
    fused = torch.cuda.is_available() or zero_stage(ds_config) == 0
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused, foreach=not fused)


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Multiplier of the peak LR for the update with index `step` (0-based): linear warm-up, cosine to a floor."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


def initialize(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict, total_steps: int):
    """The training engine of `model`: DeepSpeed's, or an FSDPEngine under --backend fsdp."""
    import deepspeed

    if cfg.compile:
        compile_blocks(model)
    if is_fsdp(ds_config):
        shard(model, ds_config["dtype"])  # before the optimizer, which must hold the sharded parameters
    optimizer = build_optimizer(model, cfg, ds_config)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.min_lr_ratio))
    if is_fsdp(ds_config):
        return FSDPEngine(model, optimizer, scheduler, cfg.accumulation_steps, cfg.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def frozen_copy(engine, ds_config: dict, device: torch.device):
    """A never-trained copy of the engine's model with its current weights, in inference mode (`frozen`)."""
    module = engine.module
    replica = type(module)(module.config)
    copy_weights(module, replica, zero_stage(ds_config) == 3)
    return frozen(replica, ds_config, device)


@torch.no_grad()
def copy_weights(source: torch.nn.Module, target: torch.nn.Module, partitioned: bool) -> None:
    """Copy the full weights of `source` (ZeRO-3 partitioned, FSDP-sharded or plain) into the same-shaped plain
    `target`."""
    import deepspeed

    targets = dict(target.named_parameters())
    for name, param in source.named_parameters():
        # One parameter at a time: a sharded rank never holds more than its shards plus the largest tensor.
        with deepspeed.zero.GatheredParameters([param], enabled=partitioned and hasattr(param, "ds_id")):
            targets[name].data.copy_(full_tensor(param.data))


def frozen(module: torch.nn.Module, ds_config: dict, device: torch.device):
    """A model that is only run forward (reference, reward model): under ZeRO-3 an engine without optimizer that
    partitions it like the trained model, else (FSDP included: no collectives in its forwards, so ranks may run
    different numbers of them) the plain module on the device."""
    import deepspeed

    module.requires_grad_(False).eval()
    if zero_stage(ds_config) < 3 or is_fsdp(ds_config):
        return module.to(device)
    inference = copy.deepcopy(ds_config)
    inference["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=module, config=inference)
    engine.eval()
    return engine


def local_numel(model) -> int:
    """Parameter elements this rank holds: its shards under ZeRO-3 or FSDP, everything otherwise."""
    def held(p) -> int:
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel()
        return p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return sum(held(p) for p in unwrap(model).parameters())


def unwrap(model) -> torch.nn.Module:
    """The module behind a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def deepspeed_reports_grad_norm(engine) -> bool:
    """ZeRO 1-3 and the bf16/fp16 optimizers keep the pre-clip norm, and so does the FSDP engine; a plain torch
    optimizer (ZeRO-0 fp32) does not."""
    return isinstance(engine, FSDPEngine) or hasattr(engine.optimizer, "_global_grad_norm")


def full_gradient_norm(engine) -> Optional[torch.Tensor]:
    """The global norm of the full gradients, for the case DeepSpeed does not report it (ZeRO-0: every rank
    holds the whole all-reduced gradient at the boundary, before the step clips it)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    # Accumulate in float64: an fp32 reduction over the embedding gradient was seen off by 3e-4 relative.
    per_tensor = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return torch.linalg.vector_norm(per_tensor)
