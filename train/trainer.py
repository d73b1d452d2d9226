"""The one training loop every stage runs: set-up, DeepSpeed engine, steps, metrics, evaluation, checkpoints.

A stage (train/stage.py) supplies its data kind, loss and FLOPs; everything else lives here once.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from model import ModelConfig, num_params
from train import checkpoint, distributed
from train.config import REPO_ROOT, ConfigError, TrainConfig, parse_config
from train.data_loading import build_data
from train.engine import (build_ds_config, deepspeed_reports_grad_norm, describe_backend, full_gradient_norm,
                          initialize, resolve_dtype, zero_stage)
from train.loggers import ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger
from train.metrics import MetricsTracker
from train.peak_flops import device_peak, describe
from train.preemption import REQUEUE_EXIT_CODE, PreemptionWatch
from train.stage import Stage

EXPORT_DIR = "export"
NONFINITE_EXIT_CODE = 1
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


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk_full_error(error: Exception, folder: Path, previous: Optional[str]) -> Optional[OSError]:
    """An error that says "disk full" when `error`, raised while saving `folder`, comes from a full disk: ENOSPC,
    or less space left than the previous checkpoint took (torch.save reports ENOSPC as a bare RuntimeError from
    its zip writer). None when the disk is not the cause."""
    free = shutil.disk_usage(folder.parent).free
    needed = folder_bytes(folder.parent / previous) if previous else None
    if getattr(error, "errno", None) != errno.ENOSPC and (needed is None or free >= needed):
        return None
    kept = (f"the previous checkpoint {folder.parent / previous} is untouched and 'latest' still names it"
            if previous else "no earlier checkpoint exists")
    full = OSError(errno.ENOSPC, f"disk full while saving checkpoint {folder} ({free:,} bytes free"
                                 + (f", the previous checkpoint took {needed:,}" if needed else "")
                                 + f"; {type(error).__name__}: {error}); {kept}", str(folder))
    print(f"ERROR: {full.strerror}", file=sys.stderr, flush=True)
    return full


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_ranks_reduce(value: float, op: str) -> float:
    if distributed.world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=distributed.device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return tensor.item() / (distributed.world_size() if op == "mean" else 1)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor
    # From pinned memory the copy is queued; from pageable memory it would wait for the stream (a host sync).
    return tensor.pin_memory().to(device, non_blocking=True)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: host_to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, stage: Stage, cfg: TrainConfig):
        self.stage, self.cfg = stage, cfg
        distributed.init_distributed()
        self.preemption = PreemptionWatch()  # before the heavy set-up: a signal during it is honoured too
        seed_everything(cfg.seed)
        self.world_size, self.device = distributed.world_size(), distributed.device()
        self.out_dir = cfg.resolve_path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"

        # The parallel config first: an option this machine cannot honour fails before the model and data are made.
        self.dtype = resolve_dtype(cfg.dtype)
        self.ds_config = build_ds_config(cfg, self.world_size, self.dtype)
        source = resolve_from_weight(cfg)
        self.model = stage.build_model(cfg, source)
        self.model_config: ModelConfig = self.model.config
        self.data = build_data(cfg, stage, self.model_config, distributed.rank(), self.world_size)
        # Per epoch: a weighted mixture that subsamples a source packs a different token count each epoch.
        self.epoch_steps = [len(self.data.train.batches(epoch)) // cfg.accumulation_steps
                            for epoch in range(cfg.epochs)]
        if min(self.epoch_steps) == 0:
            raise ConfigError(f"--batch_size {cfg.batch_size} × --accumulation_steps {cfg.accumulation_steps} × "
                              f"{self.world_size} ranks needs more data than {cfg.data_config} holds "
                              f"({len(self.data.train)} micro-batches per rank per epoch)")
        planned = sum(self.epoch_steps)
        self.total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned

        self.zero_stage = zero_stage(self.ds_config)
        self.engine = initialize(self.model, cfg, self.ds_config, self.total_steps * stage.optimizer_steps_per_step(cfg))
        stage.setup(self)  # before _resume: extra models start from the initial weights, not the resumed ones

        self.peak = device_peak(self.dtype, cfg.peak_tflops, REPO_ROOT / ".cache", all_ranks_reduce)
        self.metrics = MetricsTracker(world_size=self.world_size, device=self.device,
                                      peak_flops=self.peak.flops_per_second, total_steps=self.total_steps,
                                      warmup_steps=cfg.throughput_warmup_steps, enabled=cfg.metrics)
        self.global_step, self.epoch, self.next_batch = 0, 0, 0
        self.saved_step: Optional[int] = None
        self.wandb_id: Optional[str] = None
        if cfg.from_resume:
            self._resume()
        self.logger = self._build_loggers() if distributed.is_main() else None
        self.history: list[dict] = []
        self._write_run_config(source)

    # ----- set-up helpers -----
    def _resume(self) -> None:
        tag, state = checkpoint.load(self.engine, self.checkpoint_dir, self.stage.extra_engines())
        self.global_step = state["global_step"]
        self.epoch, self.next_batch = state["epoch"], state["next_batch"]
        self.metrics.load_state_dict(state["metrics"])
        self.wandb_id = state.get("wandb_id")
        if distributed.is_main():
            print(f"resumed from {self.checkpoint_dir / tag}: step {self.global_step}, epoch {self.epoch + 1}, "
                  f"micro-batch {self.next_batch}", flush=True)

    def _build_loggers(self) -> MultiLogger:
        loggers = [ConsoleLogger(), JsonlLogger(self.out_dir / "metrics.jsonl")]
        if self.cfg.use_wandb:
            try:
                name = self.cfg.wandb_run_name or f"{self.stage.name}-zero{self.zero_stage}-ws{self.world_size}"
                wandb_logger = WandbLogger(self.cfg.wandb_project, name, group=self.stage.name,
                                           config=self.run_config(), out_dir=self.out_dir, run_id=self.wandb_id)
                self.wandb_id = wandb_logger.run_id
                loggers.append(wandb_logger)
            except Exception as error:  # W&B must never stop training; JSONL keeps everything
                print(f"WARNING: W&B disabled: {type(error).__name__}: {error}", flush=True)
        return MultiLogger(loggers)

    def run_config(self) -> dict:
        return {
            "train": self.cfg.to_dict(), "model": self.model_config.to_dict(), "deepspeed": self.ds_config,
            "world_size": self.world_size, "zero_stage": self.zero_stage, "dtype": self.dtype,
            "peak_flops": describe(self.peak), "total_steps": self.total_steps,
            "steps_per_epoch": self.epoch_steps, "parameters": num_params(self.model_config),
            "grad_norm_source": "engine.get_global_grad_norm()" if deepspeed_reports_grad_norm(self.engine)
            else "own full-gradient norm",
            "data": self.data.describe(),
        }

    def _write_run_config(self, source: Optional[Path]) -> None:
        if not distributed.is_main():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        config = self.run_config()
        config["from_weight_path"] = str(source) if source else None
        (self.out_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
        padding = config["data"]["padding_fraction"]
        rows = (f"{self.data.mode} rows of {self.data.seq_len} tokens with {padding:.1%} padding" if padding is not None
                else f"batches of {self.cfg.batch_size} prompts")
        print(f"[{self.stage.name}] {config['parameters'] / 1e6:.2f}M params, world {self.world_size}, "
              f"{describe_backend(self.ds_config)}, {self.dtype}, {self.total_steps} steps "
              f"({self.epoch_steps[0]} in the first epoch), {rows}; peak: {self.peak.basis}", flush=True)

    # ----- the loop -----
    def loss_scale(self, local_weight: float) -> torch.Tensor:
        """The factor that turns a micro-batch's loss sum into its share of the step's objective.

        The objective is normalised by the whole step's loss units over all ranks, so every token (or pair) weighs
        the same whatever micro-batch it landed in. DeepSpeed divides by accumulation steps and averages
        gradients over ranks; the factor undoes both.
        """
        step_weight = host_to_device(torch.tensor(float(local_weight)), self.device)
        if self.world_size > 1:
            dist.all_reduce(step_weight)
        return (self.world_size * self.cfg.accumulation_steps) / step_weight.clamp_min(1.0)

    def backward_step(self, engine, objective: torch.Tensor) -> Optional[torch.Tensor]:
        """engine.backward and engine.step; at the accumulation boundary, the step's pre-clip global gradient
        norm (None elsewhere, or when unknown)."""
        engine.backward(objective)
        boundary = engine.is_gradient_accumulation_boundary()
        reports = deepspeed_reports_grad_norm(engine)
        grad_norm = full_gradient_norm(engine) if boundary and not reports else None
        held_back = None
        if grad_norm is not None:
            # ZeRO-0 fp32 steps a plain torch AdamW, which would apply a NaN update; its fused kernel skips the
            # update on the device when found_inf is set, as torch's GradScaler does: no host sync.
            held_back = ~torch.isfinite(grad_norm)
            engine.optimizer.found_inf = held_back.float()
        engine.step()
        if boundary and reports:
            # DeepSpeed's ZeRO 1-3 optimizers skip a step whose norm is not finite themselves (they read the norm
            # on the host), reporting the norm as inf and was_step_applied() as False.
            reported = engine.get_global_grad_norm()
            grad_norm = None if reported is None else torch.as_tensor(reported, dtype=torch.float64)
        if boundary:
            self.metrics.add_update(grad_norm, held_back if held_back is not None else not engine.was_step_applied())
        return grad_norm

    def optimizer_step(self, micro_batches: list[dict]) -> None:
        """One optimizer step of the stage's loss over the step's micro-batches (Stage.train_step's default)."""
        cfg, engine, stage = self.cfg, self.engine, self.stage
        with self.metrics.waiting_for_data():
            micro_batches = [stage.prepare_batch(batch) for batch in micro_batches]
        weights = [stage.loss_weight(batch) for batch in micro_batches]
        scale = self.loss_scale(sum(weights))
        grad_norm = None
        for batch, weight in zip(micro_batches, weights):
            stats = stage.batch_stats(batch, self.model_config) if cfg.metrics else None
            output = stage.loss(engine, to_device(batch, self.device))
            objective = output.loss_sum * scale
            if output.aux_loss is not None:
                objective = objective + output.aux_loss
            grad_norm = self.backward_step(engine, objective)
            if cfg.metrics:
                self.metrics.add_micro_batch(output.loss_sum, weight, stats, output.aux_loss, output.extras)
        self.metrics.add_optimizer_step(grad_norm, engine.was_step_applied())

    @torch.no_grad()
    def evaluate_loss(self) -> dict:
        """Token-weighted loss (and stage extras) over the validation split, reduced over ranks (Stage.evaluate's
        default)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        weight = 0
        extra_sums: dict[str, torch.Tensor] = {}
        extra_counts: dict[str, float] = {}
        if self.data.val is None:
            self.metrics.warn_once("no_val", f"{self.cfg.data_config} has no validation split: no eval/* metrics")
            return {}
        self.engine.eval()
        for index, batch in enumerate(self.data.val.iterate(0)):
            if self.cfg.eval_batches and index >= self.cfg.eval_batches:
                break
            batch = self.stage.prepare_batch(batch)
            output = self.stage.loss(self.engine, to_device(batch, self.device))
            loss_sum += output.loss_sum.double()
            weight += self.stage.loss_weight(batch)
            for name, (value, count) in output.extras.items():
                extra_sums[name] = extra_sums.get(name, 0) + value.double()
                extra_counts[name] = extra_counts.get(name, 0.0) + count
        self.engine.train()
        names = sorted(extra_sums)
        packed = torch.stack([loss_sum, torch.tensor(float(weight), dtype=torch.float64, device=self.device),
                              *[extra_sums[n] for n in names],
                              *[torch.tensor(extra_counts[n], dtype=torch.float64, device=self.device) for n in names]])
        if self.world_size > 1:
            dist.all_reduce(packed)
        totals = packed.tolist()
        loss = totals[0] / totals[1] if totals[1] else None
        per_token = loss is not None and self.stage.loss_unit == "token"
        record = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700)) if per_token else None}
        for i, name in enumerate(names):
            count = totals[2 + len(names) + i]
            record[f"eval/{name}"] = totals[2 + i] / count if count else None
        return record

    def _log(self, record: dict, epoch_step: int) -> None:
        steps_per_epoch = self.epoch_steps[self.epoch]
        record["train/epoch"] = self.epoch + epoch_step / steps_per_epoch
        record.update({"progress/epoch_index": self.epoch, "progress/epochs": self.cfg.epochs,
                       "progress/epoch_step": epoch_step, "progress/steps_per_epoch": steps_per_epoch,
                       "data/skipped_records": sum(self.data.skipped_records.values())})
        if self.logger is not None:
            self.logger.log(record, self.global_step)
            self.history.append(record)

    def _save(self, resume_epoch: int, resume_batch: int) -> None:
        """`resume_epoch`/`resume_batch`: where a resumed run picks up the data (micro-batch index)."""
        state = {"global_step": self.global_step, "epoch": resume_epoch, "next_batch": resume_batch,
                 "metrics": self.metrics.state_dict(), "wandb_id": self.wandb_id, "stage": self.stage.name}
        previous = checkpoint.latest_tag(self.checkpoint_dir)
        try:
            path = checkpoint.save(self.engine, self.checkpoint_dir, self.global_step, state,
                                   self.cfg.keep_checkpoints, self.stage.extra_engines())
        except Exception as error:
            raise disk_full_error(error, self.checkpoint_dir / checkpoint.tag_for(self.global_step), previous) \
                or error
        if distributed.is_main():
            print(f"saved checkpoint {path}", flush=True)

    def _export(self) -> None:
        state = checkpoint.consolidated_state_dict(self.engine, self.zero_stage)
        if distributed.is_main():
            path = self.stage.export(state, self.model_config, self.out_dir / EXPORT_DIR)
            print(f"exported weights to {path}", flush=True)
        distributed.barrier()

    def _after_step(self, epoch_step: int, done: bool) -> None:
        """Log, evaluate and checkpoint as they fall due after an optimizer step."""
        cfg = self.cfg

        def due(interval: int) -> bool:
            return bool(interval) and self.global_step % interval == 0

        evaluate = due(cfg.eval_interval) or done
        save = due(cfg.save_interval) or done
        # Saves and evaluations end a log window too: a checkpoint's token count is then exact.
        window_ends = due(cfg.log_interval) or evaluate or save
        if cfg.metrics and window_ends:
            record = self.metrics.collect(global_step=self.global_step, learning_rate=self.learning_rate)
            if evaluate:
                record.update(self.stage.evaluate(self))
            self._log(record, epoch_step)
        elif window_ends:
            self.metrics.collect_step_outcomes()
        if window_ends and self.metrics.window_nonfinite:
            self._handle_nonfinite(epoch_step)
        if save:
            self._save_after(epoch_step)
        if evaluate or save:
            self.metrics.restart_rate_clock()  # evaluation and saving are not training throughput

    def _save_after(self, epoch_step: int) -> None:
        """Checkpoint the state after `epoch_step` optimizer steps of the current epoch."""
        if epoch_step == self.epoch_steps[self.epoch]:
            self._save(resume_epoch=self.epoch + 1, resume_batch=0)
        else:
            self._save(resume_epoch=self.epoch, resume_batch=epoch_step * self.cfg.accumulation_steps)
        self.saved_step = self.global_step

    def _handle_nonfinite(self, epoch_step: int) -> None:
        """Report the last window's non-finite steps; under --nonfinite stop, checkpoint and exit non-zero.

        Every rank holds the same gathered flags, so all take the same branch."""
        steps = self.metrics.window_nonfinite
        where = ", ".join(f"step {o.step} (epoch {o.epoch + 1}, micro-batches {o.first_micro_batch}-"
                          f"{o.first_micro_batch + self.cfg.accumulation_steps - 1})" for o in steps[:5])
        where += f" and {len(steps) - 5} more" if len(steps) > 5 else ""
        applied = sum(not o.held_back for o in steps)
        outcome = (f"{len(steps) - applied} update(s) not applied"
                   + (f", {applied} APPLIED (DeepSpeed did not skip them)" if applied else ""))
        if self.cfg.nonfinite == "skip":
            if distributed.is_main():
                print(f"WARNING: non-finite loss or gradient norm at {where}: {outcome} (--nonfinite skip); "
                      f"{self.metrics.skipped_steps} step(s) skipped in this run", file=sys.stderr, flush=True)
            return
        if self.saved_step != self.global_step:
            self._save_after(epoch_step)  # a held-back update left the weights as they were before that step
        if distributed.is_main():
            print(f"ERROR: non-finite loss or gradient norm at {where}: {outcome}; stopping (--nonfinite stop) with "
                  f"the checkpoint of step {self.global_step} in {self.checkpoint_dir}; exit {NONFINITE_EXIT_CODE}",
                  file=sys.stderr, flush=True)
            self.logger.close()
        self._exit_together(NONFINITE_EXIT_CODE)

    def _exit_together(self, status: int) -> None:
        distributed.barrier()  # a rank that exits first makes the launcher kill the others: rank 0 closes first
        # At once, without interpreter shutdown: that restores the default SIGTERM action, and the launcher's
        # SIGTERM to the ranks still tearing down would then replace their status by death by signal.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    def _stop_for_preemption(self, epoch_step: int) -> None:
        """Every rank has finished the same step: save it (unless just saved) and exit for the launcher to requeue."""
        if self.saved_step != self.global_step:
            self._save_after(epoch_step)
        if distributed.is_main():
            print(f"stopping at step {self.global_step} on {self.preemption.signal_name()}: checkpoint saved, "
                  f"exit {REQUEUE_EXIT_CODE} (requeue; --from_resume continues from here)", flush=True)
            self.logger.close()
        self._exit_together(REQUEUE_EXIT_CODE)

    def train(self) -> list[dict]:
        cfg = self.cfg
        started = time.perf_counter()
        self.engine.train()
        self.learning_rate = self.engine.get_lr()[0]
        done = self.global_step >= self.total_steps
        while not done and self.epoch < cfg.epochs:
            self.metrics.start_epoch()
            start_batch = self.next_batch
            batches = self.data.train.iterate(self.epoch, start_batch=start_batch)
            epoch_step = start_batch // cfg.accumulation_steps
            while epoch_step < self.epoch_steps[self.epoch] and not done:
                learning_rate = self.engine.get_lr()[0]  # the rate this step's updates use
                self.metrics.begin_step(self.global_step + 1, self.epoch, epoch_step * cfg.accumulation_steps)
                with self.metrics.waiting_for_data():
                    micro_batches = [next(batches) for _ in range(cfg.accumulation_steps)]
                self.stage.train_step(self, micro_batches)
                self.learning_rate = learning_rate
                self.global_step += 1
                epoch_step += 1
                done = self.global_step >= self.total_steps
                self._after_step(epoch_step, done)
                if not done and self.preemption.requested():
                    self._stop_for_preemption(epoch_step)
            if epoch_step == self.epoch_steps[self.epoch]:
                self.epoch += 1
                self.next_batch = 0
        self._export()
        if distributed.is_main():
            self._write_summary(time.perf_counter() - started)
            self.logger.close()
        return self.history

    def _write_summary(self, wall_seconds: float) -> None:
        def mean(key: str) -> Optional[float]:
            values = [r[key] for r in self.history if r.get(key) is not None]
            return sum(values) / len(values) if values else None

        last = self.history[-1] if self.history else {}
        summary = {"stage": self.stage.name, "final_loss": last.get("train/loss"), "eval_loss": last.get("eval/loss"),
                   "global_step": self.global_step, "tokens_seen": self.metrics.tokens_seen,
                   "skipped_steps": self.metrics.skipped_steps, "nonfinite_steps": self.metrics.nonfinite_steps,
                   "skipped_records": self.data.skipped_records,
                   "mean_tokens_per_second": mean("train/tokens_per_second"),
                   "mean_mfu_percent": mean("train/mfu_percent"), "wall_time_s": wall_seconds,
                   "eval": {key: value for key, value in last.items() if key.startswith("eval/")}}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[{self.stage.name}] done: {json.dumps(summary)}", flush=True)


def main(stage: Stage, defaults: dict, argv: Optional[list[str]] = None) -> list[dict]:
    """Entry point of a stage script: its defaults, then --config YAML, then flags."""
    cfg = parse_config({"stage": stage.name, **defaults}, argv, cls=stage.config_class,
                       description=f"zerostage {stage.name} stage")
    return Trainer(stage, cfg).train()
