"""The DeepSpeed backend (`--backend deepspeed`, the default): ZeRO 0-3 as the --deepspeed JSON says.

`ds_configs/*.json` hold only ZeRO/offload choices; batch sizes, clipping and precision are filled from the run's
flags so they cannot disagree with what the loop does. DeepSpeed's own conventions stay in here: it divides a
loss by the accumulation steps (switched off) and averages gradients over ranks (the objective is scaled by the
world size to make that a sum), and only its ZeRO 1-3 and mixed-precision optimizers report the gradient norm.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from train import distributed
from train.backend import Backend, TrainedModel, Update, adamw, restore_peak_learning_rate
from train.config import ConfigError, TrainConfig

_AUTO = "auto"
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def load_ds_config(path: Path) -> dict:
    if not path.is_file():
        choices = sorted(p.name for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise ConfigError(f"--deepspeed: {path} does not exist" + (f"; choices: {', '.join(choices)}" if choices else ""))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError too: it gives the byte position
        raise ConfigError(f"--deepspeed: {path} is not valid UTF-8 JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed: {path} must hold a JSON object at the top level, got {type(config).__name__}")
    check_ds_types(config, str(path))
    return config


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return (_integer(value) or isinstance(value, float)) and math.isfinite(value)


def check_ds_types(ds: dict, src: str) -> None:
    """The keys this backend reads, typed: DeepSpeed would take `"stage": "2"` or `"bf16": true` late or wrongly."""
    def check(section: dict, key: str, ok, expected: str, prefix: str = "") -> None:
        if key in section and not ok(section[key]):
            raise ConfigError(f"{src}: '{prefix}{key}' must be {expected}, got {json.dumps(section[key])}")

    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        check(ds, key, lambda v: v == _AUTO or _integer(v) and v >= 1, 'an integer >= 1 or "auto"')
    check(ds, "gradient_clipping", lambda v: v == _AUTO or _number(v) and v >= 0, 'a number >= 0 or "auto"')
    check(ds, "steps_per_print", lambda v: _integer(v) and v >= 1, "an integer >= 1")
    for key in ("bf16", "fp16", "zero_optimization", "data_types"):
        check(ds, key, lambda v: isinstance(v, dict), "an object")
    for key in ("bf16", "fp16"):
        check(ds.get(key, {}), "enabled", lambda v: v == _AUTO or isinstance(v, bool), 'true, false or "auto"',
              f"{key}.")
    zero = ds.get("zero_optimization", {})
    check(zero, "stage", lambda v: _integer(v) and v in (0, 1, 2, 3), "one of the numbers 0, 1, 2, 3",
          "zero_optimization.")
    for key in ("offload_param", "offload_optimizer"):
        check(zero, key, lambda v: isinstance(v, dict), "an object", "zero_optimization.")


def _fill(config: dict, key: str, value, source: str, option: str) -> None:
    """Set an "auto" (or absent) value; an explicit one must agree with the run's flags."""
    current = config.get(key, _AUTO)
    if current == _AUTO:
        config[key] = value
    elif current != value:
        raise ConfigError(f"{source}: '{key}' is {current} but {option} gives {value}; set it to \"auto\" "
                          f"or make them agree")


def auto_config(world_size: int, saved_backend: str = "") -> str:
    """--deepspeed auto: the ZeRO stage of the run resumed (saved_backend "ZeRO-<n>": it stays itself on any number
    of ranks; ZeRO-0 files hold the whole optimizer), else ZeRO-0 on one rank (plain fused AdamW: ZeRO's flat buffers
    shard nothing there and cost 1.2x in step time, docs/performance.md) and ZeRO-2 on more."""
    match = re.fullmatch(r"ZeRO-(\d)", saved_backend)
    return f"ds_configs/zero{match.group(1) if match else 0 if world_size == 1 else 2}.json"


def build_ds_config(cfg: TrainConfig, world_size: int, dtype: str) -> dict:
    """The --deepspeed JSON with the run's batch sizes, clipping and precision filled in, checked."""
    path = cfg.resolve_path(auto_config(world_size) if cfg.deepspeed == "auto" else cfg.deepspeed)
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
    # Gradients reduced and accumulated in fp32, as FSDP's reduce_dtype does: under bf16/fp16 DeepSpeed's default is
    # the model's dtype for both. ZeRO-0 cannot: DeepSpeed refuses an accumulation dtype other than the model's
    # without ZeRO ("unsupported mix"), so there each micro-batch's gradient is summed in fp32 and held in bf16/fp16.
    _fill(ds, "communication_data_type", "fp32", src, "zerostage's fp32 gradient reduction")
    if stage > 0 or dtype == "fp32":
        _fill(ds.setdefault("data_types", {}), "grad_accum_dtype", "fp32", src, "zerostage's fp32 accumulation")
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


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    frozen_forward_is_collective = False  # set per ZeRO stage below

    def __init__(self, cfg: TrainConfig, world_size: int, dtype: str):
        super().__init__(dtype)
        self.ds_config = build_ds_config(cfg, world_size, dtype)
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self.shards_parameters = self.frozen_forward_is_collective = self.zero_stage == 3
        self.world_size = world_size

    def describe(self) -> str:
        return f"ZeRO-{self.zero_stage}"

    def run_tag(self) -> str:
        return f"zero{self.zero_stage}"

    def settings(self) -> dict:
        return self.ds_config

    def run_config(self) -> dict:
        return {**super().run_config(), "zero_stage": self.zero_stage}

    def optimizer(self, groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
        offload = self.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
        if offload not in (None, "none"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    adamw_mode=True)
        # ZeRO-0 fp32 steps this optimizer itself: the fused kernel lets DeepSpeedModel.step skip a non-finite update
        # on the device (found_inf), which DeepSpeed's ZeRO 1-3 optimizers do themselves.
        return adamw(groups, cfg, fused=torch.cuda.is_available() or self.zero_stage == 0)

    def trained(self, model, optimizer, scheduler) -> "DeepSpeedModel":
        import deepspeed

        # DeepSpeed copies its fp32 masters from the module it has cast to bf16/fp16: the initial (or --from_weight)
        # weights are rounded before the first step, where FSDP's masters are the fp32 weights. Kept here, set below.
        initial = {} if self.dtype == "fp32" else {name: p.detach().to("cpu", copy=True)
                                                   for name, p in model.named_parameters()}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=copy.deepcopy(self.ds_config))  # one engine per model
        trained = DeepSpeedModel(engine, self.world_size, partitioned=self.zero_stage == 3)
        if initial:
            trained.set_masters(initial)
        return trained

    def frozen(self, module: torch.nn.Module):
        """Under ZeRO-3 an engine without optimizer that partitions the model like the trained one (it casts to the
        training dtype itself); else the plain module on the device, in the training dtype."""
        module.requires_grad_(False).eval()
        if not self.frozen_forward_is_collective:
            return module.to(distributed.device(), self.torch_dtype)
        import deepspeed

        inference = copy.deepcopy(self.ds_config)
        inference["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=module, config=inference)
        engine.eval()
        return engine


class DeepSpeedModel(TrainedModel):
    def __init__(self, engine, world_size: int, partitioned: bool):
        self.engine, self.module, self.world_size, self.partitioned = engine, engine.module, world_size, partitioned
        self.runner = engine
        # ZeRO-0 bf16/fp16 wraps torch AdamW in FP16_UnfusedOptimizer (fp32 master copies, scale 1 under bf16). Under
        # fp16, DeepSpeed 0.19.8's engine.backward scales the loss only for its ZeRO optimizers, yet this wrapper
        # unscales the gradients: the loss is scaled here and the norm divided.
        self.unfused = type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer"
        # ZeRO 1-3 keep the pre-clip norm of their partitions. ZeRO-0 would report and clip with torch's fp32 CPU norms
        # (a plain torch optimizer: up to 8e-4 low on a 25M-parameter model; the bf16 wrapper: 8e-5 low on `tiny` at
        # 2 ranks), which sum squares sequentially into few fp32 accumulators: it uses its own float64 norm instead.
        self.reports_grad_norm = hasattr(engine.optimizer, "_global_grad_norm") and not self.unfused
        self.grad_norm_source = ("DeepSpeed's get_global_grad_norm()" if self.reports_grad_norm
                                 else "own float64 norm of the full gradients")
        self.grad_clip, self.master_clip_norm = 0.0, None
        if not self.reports_grad_norm:
            self.grad_clip, engine._config.gradient_clipping = engine.gradient_clipping(), 0.0
            if self.unfused:
                # The wrapper clips its fp32 masters' gradients after copying and unscaling them: that clip, with
                # this norm, runs just before its torch optimizer steps (bf16 gradients clipped in place would be
                # rounded again, 2e-4 off the threshold on `tiny`).
                engine.optimizer.clip_grad = 0.0
                engine.optimizer.optimizer.register_step_pre_hook(self._clip_masters)

    @property
    def learning_rate(self) -> float:
        return self.engine.get_lr()[0]

    def masters(self) -> dict:
        """id of each module parameter -> its fp32 master where DeepSpeed's ZeRO-0 bf16/fp16 wrapper keeps it
        (ZeRO 1-3 are reached through safe_get/set_full_fp32_param)."""
        if not self.unfused:
            return {}
        wrapper = self.engine.optimizer
        return {id(low): high for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                for low, high in zip(lows, highs)}

    @torch.no_grad()
    def set_masters(self, weights: dict) -> None:
        """Make the fp32 masters these full weights (name -> tensor); the module keeps its rounding of them."""
        from deepspeed.utils import safe_set_full_fp32_param

        masters = self.masters()
        for name, param in self.module.named_parameters():
            if id(param) in masters:
                masters[id(param)].copy_(weights[name])
            else:
                safe_set_full_fp32_param(param, weights[name].to(param.device))
        if self.unfused:
            # The wrapper also stepped the torch AdamW once on zero gradients to create its state: a weight decay,
            # and Adam's step count 1 ahead, which shrank the first real update ×0.73 (bias correction of step 2).
            self.engine.optimizer.optimizer.state.clear()

    def loss_scale(self) -> float:
        """The scale ZeRO-0 bf16/fp16 needs applied to the objective (1 elsewhere: DeepSpeed applies its own)."""
        return self.engine.optimizer.loss_scale_config.cur_scale if self.unfused else 1.0

    def backward(self, objective: torch.Tensor) -> None:
        # It averages over ranks.
        self.engine.backward(objective * (self.world_size * self.loss_scale()), scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only counts the micro-step: DeepSpeed reduces at the boundary it counts to

    def step(self) -> Update:
        engine = self.engine
        learning_rate = self.learning_rate
        grad_norm = held_back = None
        scale = self.loss_scale()  # the backward's: the step may change it
        if not self.reports_grad_norm:
            grad_norm = full_gradient_norm(self.module)
            if grad_norm is not None:
                if not self.unfused:
                    # ZeRO-0 fp32 steps a plain torch AdamW, which would apply a NaN update; its fused kernel skips
                    # the update on the device when found_inf is set, as torch's GradScaler does: no host sync.
                    # (The bf16/fp16 wrapper finds non-finite gradients itself and skips the step.)
                    held_back = ~torch.isfinite(grad_norm)
                    engine.optimizer.found_inf = held_back.float()
                grad_norm = grad_norm / scale
                if self.grad_clip > 0 and self.unfused:
                    self.master_clip_norm = grad_norm.float()
                elif self.grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), self.grad_clip, grad_norm.float())
        engine.step()
        self.master_clip_norm = None  # a step the wrapper skipped (fp16 overflow) did not use it
        if self.reports_grad_norm:
            # DeepSpeed's ZeRO 1-3 optimizers skip a step whose norm is not finite themselves (they read the norm
            # on the host), reporting the norm as inf and was_step_applied() as False.
            reported = engine.get_global_grad_norm()
            grad_norm = None if reported is None else torch.as_tensor(reported, dtype=torch.float64) / scale
        applied = engine.was_step_applied()
        return Update(grad_norm, held_back if held_back is not None else not applied, applied, learning_rate)

    def _clip_masters(self, optimizer, args, kwargs) -> None:
        if self.master_clip_norm is not None:
            masters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(masters, self.grad_clip, self.master_clip_norm)

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: Path, tag: str) -> tuple[bool, Optional[dict]]:
        """Collective. ZeRO 1-3 saved by another number of ranks: through DeepSpeed's universal checkpoint, which
        rank 0 converts into <tag>/universal once. ZeRO-0 files hold the whole optimizer: they load on any number."""
        saved_ranks = len(list((directory / tag).glob(OPTIMIZER_SHARDS)))
        universal = saved_ranks not in (0, distributed.world_size())
        if universal:
            directory, tag = directory / tag, universal_checkpoint(directory / tag, saved_ranks)
        # DeepSpeed reads this switch at load time only; set for this load rather than in the config of every
        # engine, so a resume on the same number of ranks keeps the native (exact, conversion-free) load.
        self.engine._config.load_universal_checkpoint = universal
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        self.engine._config.load_universal_checkpoint = False
        if universal and self.partitioned:
            self._repair_zero3_universal_load(directory / tag)
        restore_peak_learning_rate(self.engine.lr_scheduler, self.peak_learning_rate)
        return path is not None, client_state

    def _repair_zero3_universal_load(self, folder: Path) -> None:
        """Two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py, load_hp_checkpoint_state_from_checkpoint_
        dir_stage3), which made the loss drift 6e-4 from the uninterrupted run in 3 steps: every parameter group gets
        the first group's settings (the norms would take weight decay), and one step-count tensor goes to every group,
        which AdamW then advances in place once per group (Adam's bias correction runs ahead)."""
        from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

        saved = torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False)[OPTIMIZER_STATE_DICT]
        for group, own in zip(self.engine.optimizer.param_groups, saved["param_groups"]):
            group.update({key: value for key, value in own.items() if key != "params"})
        for state in self.engine.optimizer.optimizer.state.values():
            state["step"] = state["step"].clone()

    def full_state_dict(self) -> Optional[dict]:
        """The fp32 master weights (the optimizer's), not the bf16/fp16 module's: an export of the module would round
        every stage hand-off. Collective under ZeRO 1-3, one parameter at a time (bounded by the largest tensor)."""
        from deepspeed.utils import safe_get_full_fp32_param

        masters = self.masters()
        state = {}
        for name, param in self.module.named_parameters():
            master = masters.get(id(param))
            if master is None:
                master = safe_get_full_fp32_param(param)  # ZeRO 1-3: the optimizer's fp32 partitions, gathered
            if master is None and param.dtype == torch.float32 and not self.partitioned:
                master = param  # ZeRO-0 fp32: the module's weights are the ones the optimizer steps
            if master is None:
                raise RuntimeError(f"no fp32 master weight found for {name} ({param.dtype}, "
                                   f"{type(self.engine.optimizer).__name__}): refusing to export rounded weights")
            if distributed.is_main():
                state[name] = master.detach().to("cpu", torch.float32, copy=True)
        return state if distributed.is_main() else None

    @torch.no_grad()
    def copy_weights_to(self, target: torch.nn.Module) -> None:
        import deepspeed

        targets = dict(target.named_parameters())
        for name, param in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], enabled=self.partitioned):
                targets[name].data.copy_(param.data)


OPTIMIZER_SHARDS = "*_optim_states.pt"  # one per rank under ZeRO 1-3, as ds_to_universal finds them
UNIVERSAL = "universal"


def universal_checkpoint(folder: Path, saved_ranks: int) -> str:
    """Every rank: the tag, under `folder`, of its universal form (per parameter: the fp32 weight, Adam's moments
    and step), made by rank 0 unless an earlier start made it; renamed into place whole, so a killed conversion is
    redone rather than loaded."""
    if distributed.is_main() and not (folder / UNIVERSAL).is_dir():
        from deepspeed.checkpoint import ds_to_universal

        print(f"{folder} was saved by {saved_ranks} ranks and this run has {distributed.world_size()}: converting it "
              f"to DeepSpeed's universal checkpoint in {folder / UNIVERSAL}", flush=True)
        scratch = folder / f"{UNIVERSAL}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        # One worker each: the rank's own process (a process pool forked from a rank would inherit its threads).
        args = argparse.Namespace(input_folder=str(folder), output_folder=str(scratch / UNIVERSAL),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # the state only Megatron-DeepSpeed records
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not the run's output
            ds_to_universal.main(args)
        (scratch / UNIVERSAL).rename(folder / UNIVERSAL)
        shutil.rmtree(scratch)
    # Waiting for the folder rather than in a barrier: a large model's conversion can outlast NCCL's 10-minute
    # collective timeout. A rank 0 that fails exits, and the launcher then stops the waiting ranks.
    while not (folder / UNIVERSAL).is_dir():
        time.sleep(1)
    return UNIVERSAL


def full_gradient_norm(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """The global norm of the full gradients, for the case DeepSpeed does not report it (ZeRO-0: every rank
    holds the whole all-reduced gradient at the boundary, before the step clips it)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    # Accumulate in float64: an fp32 reduction over the embedding gradient was seen off by 3e-4 relative.
    per_tensor = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return torch.linalg.vector_norm(per_tensor)
