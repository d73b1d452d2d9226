"""The one training loop every stage runs: set-up, steps, metrics, evaluation, checkpoints.

The Trainer is built from components with one job each: the backend (train/backend.py) makes the trained model,
the data (train/data_loading.py) the loaders, the tracker (train/metrics.py) the numbers, the loggers write them,
and train/checkpoint.py saves the models with the TrainState. It calls the stage (train/stage.py) for what differs:
its model, its step over the micro-batches (through the Updater) and its evaluation of a validation batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from model import num_params
from train import checkpoint, distributed, exports, run_dir
from train.backend import build_backend
from train.compile import compile_seconds
from train.config import REPO_ROOT, ConfigError, TrainConfig
from train.data_loading import build_data, load_run_tokenizer
from train.exports import EXPORT_DIR, resolve_from_weight
from train.loggers import ConsoleLogger, JsonlLogger, MultiLogger, WandbLogger, pipeline_group
from train.metrics import MetricsTracker
from train.peak_flops import describe, device_peak, peak_memory_bandwidth
from train.preemption import REQUEUE_EXIT_CODE, PreemptionWatch
from train.stage import Stage, StageContext, StepReport
from train.updater import Updater

NONFINITE_EXIT_CODE = 1


def finite_or_null(value):
    """A JSON-ready copy with every non-finite float as None: NaN is not JSON."""
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Where the run is: what a checkpoint restores besides the weights (with the tracker's cumulative counts)."""
    stage: str
    metrics: MetricsTracker
    epoch_steps: list[int]  # optimizer steps of each epoch
    accumulation_steps: int
    global_step: int = 0
    epoch: int = 0  # 0-based
    epoch_step: int = 0  # optimizer steps done in `epoch`
    wandb_id: Optional[str] = None

    def state_dict(self) -> dict:
        """`epoch` / `epoch_step`: where a resumed run picks up the data, in optimizer steps of the epoch, which
        read the same rows on any number of ranks (the global batch is kept, train/run_dir.py)."""
        if self.epoch_step == self.epoch_steps[self.epoch]:
            epoch, epoch_step = self.epoch + 1, 0
        else:
            epoch, epoch_step = self.epoch, self.epoch_step
        return {"global_step": self.global_step, "epoch": epoch, "epoch_step": epoch_step,
                "metrics": self.metrics.state_dict(), "wandb_id": self.wandb_id, "stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.epoch = state["global_step"], state["epoch"]
        # A checkpoint from before elastic resume holds this rank's micro-batch index, saved on this many ranks.
        self.epoch_step = state.get("epoch_step", state.get("next_batch", 0) // self.accumulation_steps)
        self.metrics.load_state_dict(state["metrics"])
        self.wandb_id = state.get("wandb_id")


class Trainer:
    def __init__(self, stage: Stage, cfg: TrainConfig):
        self.stage, self.cfg = stage, cfg
        if not cfg.verbose:
            # DeepSpeed's ZeRO 1-3 call torch.distributed collectives torch has deprecated: one warning per rank and
            # call site, which is not the user's to act on. --verbose shows them.
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        distributed.init_distributed()
        self.preemption = PreemptionWatch()  # before the heavy set-up: a signal during it is honoured too
        seed_everything(cfg.seed)
        self.world_size, self.device = distributed.world_size(), distributed.device()
        self.out_dir = cfg.resolve_path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        saved = None
        if cfg.from_resume:  # before anything sized by --accumulation_steps is made
            folder, saved = checkpoint.newest_run(self.checkpoint_dir)
            self.cfg = cfg = run_dir.keep_global_batch(cfg, saved, self.world_size, folder)
        self.cfg = cfg = run_dir.resolve_deepspeed_config(cfg, saved, self.world_size)

        # The backend first: an option this machine cannot honour fails before the model and data are made.
        self.backend = build_backend(cfg, self.world_size)
        self.run_dir_lock = run_dir.claim_on_rank0(cfg, self.out_dir)  # held for the run's life (rank 0)
        source = resolve_from_weight(cfg)
        tokenizer = load_run_tokenizer(cfg)
        if source is not None:
            exports.check_tokenizer(cfg, "from_weight", source, tokenizer)
        module = stage.build_model(cfg, source)
        self.model_config = module.config
        self.data = build_data(cfg, stage, self.model_config, distributed.rank(), self.world_size, tokenizer)
        # Per epoch: a weighted mixture that subsamples a source packs a different token count each epoch.
        self.epoch_steps = [len(self.data.train.batches(epoch)) // cfg.accumulation_steps
                            for epoch in range(cfg.epochs)]
        if min(self.epoch_steps) == 0:
            raise ConfigError(f"--batch_size {cfg.batch_size} × --accumulation_steps {cfg.accumulation_steps} × "
                              f"{self.world_size} ranks needs more data than {cfg.data_config or cfg.data_path} holds "
                              f"({len(self.data.train)} micro-batches per rank per epoch)")
        planned = sum(self.epoch_steps)
        self.total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned
        # Before the engines are built: a resume that is not this run fails fast, with nothing loaded or changed.
        resume_tag = self._check_resume() if cfg.from_resume else None

        self.model = self.backend.wrap(module, cfg, self.total_steps * stage.optimizer_steps_per_step(cfg))
        # Before the resume: a stage's extra models start from the initial weights, not the resumed ones.
        stage.setup(StageContext(cfg, self.device, self.data.tokenizer, self.model, self.backend, self.total_steps))

        self.peak = device_peak(self.backend.dtype, cfg.peak_tflops, REPO_ROOT / ".cache")
        # Measured on CPU (every rank at once), so only where a stage decodes and its MBU is logged.
        self.peak_bandwidth = (peak_memory_bandwidth(self.device, cfg.peak_memory_gb_per_s, REPO_ROOT / ".cache")
                               if stage.generates and cfg.metrics else None)
        self.metrics = MetricsTracker(world_size=self.world_size, device=self.device,
                                      peak_flops=self.peak.flops_per_second, total_steps=self.total_steps,
                                      warmup_steps=cfg.throughput_warmup_steps, enabled=cfg.metrics,
                                      eval_interval=cfg.eval_interval, save_interval=cfg.save_interval,
                                      compile_seconds=compile_seconds if cfg.compile else None,
                                      peak_bandwidth=self.peak_bandwidth)
        self.updater = Updater(self.device, lambda update: self.metrics.add_update(update.grad_norm,
                                                                                   update.held_back))
        self.state = TrainState(stage.name, self.metrics, self.epoch_steps, cfg.accumulation_steps)
        self.saved_step: Optional[int] = None
        if resume_tag is not None:
            self._resume(resume_tag)
        self.logger = self._build_loggers() if distributed.is_main() else None
        self.history: list[dict] = []  # every metric line, on every rank
        self.learning_rate = self.model.learning_rate  # the rate of the last step taken
        self._write_run_config(source)

    # ----- set-up helpers -----
    def run_identity(self) -> dict:
        """What makes this run itself: a resume that differs in any of these would be another run."""
        return {"stage": self.stage.name, "model": self.model_config.to_dict(),
                "tokenizer_sha256": self.data.tokenizer.fingerprint, "data_key": self.data.prepared.key,
                "packing": self.data.mode, "seq_len": self.data.seq_len,
                "global_batch": run_dir.global_batch(run_dir.layout(self.cfg, self.world_size)),
                "backend": self.backend.describe(), "dtype": self.backend.dtype, "seed": self.cfg.seed}

    def _check_resume(self) -> str:
        """The checkpoint to resume (the latest that verifies), once it is known to be this run's."""
        tag = checkpoint.usable_tag(self.checkpoint_dir)
        changed = run_dir.check_resume(checkpoint.read_run(self.checkpoint_dir / tag), self.run_identity(),
                                       self.cfg, self.world_size, self.checkpoint_dir / tag)
        if changed and distributed.is_main():
            print(f"resuming with changed options: {'; '.join(changed)}", flush=True)
        return tag

    def _resume(self, tag: str) -> None:
        state = checkpoint.load(self.model, self.checkpoint_dir, tag, self.stage.trained_models())
        self.state.load_state_dict(state)
        if distributed.is_main():
            print(f"resumed from {self.checkpoint_dir / tag}: step {self.state.global_step}, epoch "
                  f"{self.state.epoch + 1}, micro-batch {self.state.epoch_step * self.cfg.accumulation_steps} on "
                  + ("1 rank" if self.world_size == 1 else f"each of {self.world_size} ranks"), flush=True)

    def _build_loggers(self) -> MultiLogger:
        resumed_step = self.state.global_step if self.cfg.from_resume else None
        loggers = [ConsoleLogger(), JsonlLogger(self.out_dir / "metrics.jsonl", resumed_step)]
        if self.cfg.use_wandb:
            try:
                name = self.cfg.wandb_run_name or f"{self.stage.name}-{self.backend.run_tag()}-ws{self.world_size}"
                group = self.cfg.wandb_group or pipeline_group(self.cfg.resolve_path(self.cfg.out_root))
                wandb_logger = WandbLogger(self.cfg.wandb_project, name, group=group, job_type=self.stage.name,
                                           config=self.run_config(), out_dir=self.out_dir, run_id=self.state.wandb_id)
                self.state.wandb_id = wandb_logger.run_id
                loggers.append(wandb_logger)
            except Exception as error:  # W&B must never stop training; JSONL keeps everything
                print(f"WARNING: W&B disabled: {type(error).__name__}: {error}", flush=True)
        return MultiLogger(loggers)

    def run_config(self) -> dict:
        cfg = self.cfg
        return {
            "train": cfg.to_dict(), "model": self.model_config.to_dict(), **self.backend.run_config(),
            "world_size": self.world_size, "dtype": self.backend.dtype,
            "global_batch_size": cfg.batch_size * cfg.accumulation_steps * self.world_size,
            "peak_flops": describe(self.peak), "peak_memory_bandwidth_bytes_per_second": self.peak_bandwidth,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.epoch_steps, "parameters": num_params(self.model_config),
            "grad_norm_source": self.model.grad_norm_source, "data": self.data.describe(),
        }

    def _write_run_config(self, source) -> None:
        if not distributed.is_main():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        config = self.run_config()
        config["from_weight_path"] = str(source) if source else None
        (self.out_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
        padding = config["data"]["padding_fraction"]
        rows = (f"{self.data.mode} rows of {self.data.seq_len} tokens with {padding:.1%} padding" if padding is not None
                else f"batches of {self.cfg.batch_size} prompts")
        # What changes the cost of a step beyond the backend and dtype: said here, not only in run_config.json.
        cost = "".join(f", {name}" for name, on in (("activation checkpointing", self.cfg.activation_checkpointing),
                                                   ("--compile", self.cfg.compile),
                                                   (f"loss chunks of {self.cfg.loss_chunk_tokens} tokens",
                                                    self.cfg.loss_chunk_tokens)) if on)
        print(f"[{self.stage.name}] {config['parameters'] / 1e6:.2f}M params, world {self.world_size}, "
              f"{self.backend.describe()}, {self.backend.dtype}{cost}, {self.total_steps} steps "
              f"({self.epoch_steps[0]} in the first epoch), {rows}; peak: {self.peak.basis}", flush=True)

    # ----- one step -----
    def train_step(self, micro_batches: list[dict]) -> StepReport:
        """The work of one global step on the loader's micro-batches: the stage's step, recorded in the metrics."""
        with self.metrics.waiting_for_data():
            micro_batches = [self.stage.prepare_batch(batch) for batch in micro_batches]
        report = self.stage.train_step(micro_batches, self.updater)
        if self.cfg.metrics:
            for micro in report.micro_batches:
                self.metrics.add_micro_batch(micro.loss_sum, micro.loss_units, micro.stats, micro.aux_loss,
                                             micro.extras)
            for phase in report.phases:
                self.metrics.add_phase(phase)
            for name, value in report.last_values.items():
                self.metrics.set_last(name, value)
        self.metrics.add_optimizer_step(report.update.grad_norm, report.update.applied)
        return report

    def step(self, micro_batches: list[dict], final: bool = False) -> None:
        """One global step and what falls due after it: a metric line, an evaluation, a checkpoint (`final`: the
        run's last step, which evaluates and saves)."""
        state = self.state
        self.metrics.begin_step(state.global_step + 1, state.epoch, state.epoch_step * self.cfg.accumulation_steps)
        report = self.train_step(micro_batches)
        self.learning_rate = report.update.learning_rate  # RL: the round's last update's (its schedule steps each)
        state.global_step += 1
        state.epoch_step += 1
        self._after_step(final)

    def _after_step(self, final: bool) -> None:
        cfg, step = self.cfg, self.state.global_step

        def due(interval: int) -> bool:
            return bool(interval) and step % interval == 0

        evaluate = due(cfg.eval_interval) or final
        save = due(cfg.save_interval) or final
        # Saves and evaluations end a log window too: a checkpoint's token count is then exact.
        if due(cfg.log_interval) or evaluate or save:
            self._end_window(evaluate)
        if save:
            self._save()
        if evaluate or save:
            self.metrics.restart_rate_clock()  # evaluation and saving are not training throughput

    def _end_window(self, evaluate: bool = False) -> None:
        """Gather the window's metrics over the ranks into a metric line (with an evaluation when due) and check
        its steps for non-finite values."""
        if self.cfg.metrics:
            record = self.metrics.collect(global_step=self.state.global_step, learning_rate=self.learning_rate)
            if evaluate:
                started = time.perf_counter()
                record.update(self.evaluate())  # ends in a reduction to the host: the device is done
                self.metrics.add_overhead("eval", time.perf_counter() - started)
            self._log(record)
        else:
            self.metrics.collect_step_outcomes()
        if self.metrics.window_nonfinite:
            self._handle_nonfinite()

    # ----- evaluation -----
    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval/* over the validation split: the stage's per-batch sums, reduced over ranks in one collective."""
        if self.data.val is None:
            self.metrics.warn_once("no_val", f"{self.cfg.data_config or self.cfg.data_path} has no validation split: "
                                               f"no eval/* metrics")
            return {}
        self.model.eval()
        self.stage.begin_evaluation(self.state.global_step)
        sums: dict[str, list] = {}
        for index, batch in enumerate(self.data.val.iterate(0)):
            if self.cfg.eval_batches and index >= self.cfg.eval_batches:
                break
            for name, (value, count) in self.stage.evaluate_batch(batch).items():
                total = sums.setdefault(name, [0.0, 0.0])
                total[0] = total[0] + (value.double() if isinstance(value, torch.Tensor) else value)
                total[1] += count
        self.model.train()
        names = sorted(sums)
        packed = torch.stack([torch.as_tensor(sums[name][i], dtype=torch.float64, device=self.device)
                              for i in (0, 1) for name in names]) if names else None
        totals = distributed.sum_over_ranks(packed).tolist() if names else []
        means = {name: totals[i] / totals[len(names) + i] if totals[len(names) + i] else None
                 for i, name in enumerate(names)}
        record = {}
        if "loss" in means:
            loss = means.pop("loss")
            per_token = loss is not None and self.stage.loss_unit == "token"
            record = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700)) if per_token else None}
        return {**record, **{f"eval/{name}": value for name, value in means.items()}}

    # ----- logging, checkpoints, stopping -----
    def _log(self, record: dict) -> None:
        state = self.state
        steps_per_epoch = self.epoch_steps[state.epoch]
        record["train/epoch"] = state.epoch + state.epoch_step / steps_per_epoch
        record["system/unix_time"] = int(time.time())  # when the line was written: one time axis for a pipeline
        record.update({"progress/epoch_index": state.epoch, "progress/epochs": self.cfg.epochs,
                       "progress/epoch_step": state.epoch_step, "progress/steps_per_epoch": steps_per_epoch,
                       "data/skipped_records": sum(self.data.skipped_records.values())})
        self.history.append(record)
        if self.logger is not None:
            self.logger.log(record, state.global_step)

    def _save(self) -> None:
        """Checkpoint the models and the state after the step just taken."""
        started = time.perf_counter()
        previous = checkpoint.latest_tag(self.checkpoint_dir)
        try:
            path = checkpoint.save(self.model, self.checkpoint_dir, self.state.global_step, self.state.state_dict(),
                                   self.cfg.keep_checkpoints, self.stage.trained_models(),
                                   run={"identity": self.run_identity(), "train": self.cfg.to_dict(),
                                        "layout": run_dir.layout(self.cfg, self.world_size)})
        except Exception as error:
            raise checkpoint.disk_full_error(error, self.checkpoint_dir / checkpoint.tag_for(self.state.global_step),
                                             previous) or error
        if distributed.is_main():
            print(f"saved checkpoint {path}", flush=True)
        self.saved_step = self.state.global_step
        self.metrics.add_overhead("save", time.perf_counter() - started)

    def _export(self) -> None:
        state = self.model.full_state_dict()
        if distributed.is_main():
            path = self.stage.export(state, self.model_config, self.out_dir / EXPORT_DIR)
            exports.write_provenance(path, self.stage.name, self.state.global_step, self.data.tokenizer)
            print(f"exported weights to {path}", flush=True)
        distributed.barrier()

    def _handle_nonfinite(self) -> None:
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
        if self.saved_step != self.state.global_step:
            self._save()  # a held-back update left the weights as they were before that step
        if distributed.is_main():
            print(f"ERROR: non-finite loss or gradient norm at {where}: {outcome}; stopping (--nonfinite stop) with "
                  f"the checkpoint of step {self.state.global_step} in {self.checkpoint_dir}; exit "
                  f"{NONFINITE_EXIT_CODE}", file=sys.stderr, flush=True)
            self.logger.close()
        self._exit_together(NONFINITE_EXIT_CODE)

    def _exit_together(self, status: int) -> None:
        distributed.barrier()  # a rank that exits first makes the launcher kill the others: rank 0 closes first
        # At once, without interpreter shutdown: that restores the default SIGTERM action, and the launcher's
        # SIGTERM to the ranks still tearing down would then replace their status by death by signal.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    def _stop_for_preemption(self) -> None:
        """Every rank has finished the same step: save it (unless just saved) and exit for the launcher to requeue.
        The window since the last log step ends first: its counts go into the checkpoint, its steps are checked."""
        if self.metrics.window_open:
            self._end_window()
        if self.saved_step != self.state.global_step:
            self._save()
        if distributed.is_main():
            print(f"stopping at step {self.state.global_step} on {self.preemption.signal_name()}: checkpoint saved, "
                  f"exit {REQUEUE_EXIT_CODE} (requeue; --from_resume continues from here)", flush=True)
            self.logger.close()
        self._exit_together(REQUEUE_EXIT_CODE)

    # ----- the loop -----
    def train(self) -> list[dict]:
        cfg, state = self.cfg, self.state
        started = time.perf_counter()
        self.model.train()
        self.metrics.restart_rate_clock()  # set-up and checkpoint loading are not training time
        done = state.global_step >= self.total_steps
        while not done and state.epoch < cfg.epochs:
            self.metrics.start_epoch(resumed=state.epoch_step > 0)
            batches = self.data.train.iterate(state.epoch, start_batch=state.epoch_step * cfg.accumulation_steps)
            while state.epoch_step < self.epoch_steps[state.epoch] and not done:
                with self.metrics.waiting_for_data():
                    micro_batches = [next(batches) for _ in range(cfg.accumulation_steps)]
                done = state.global_step + 1 >= self.total_steps
                self.step(micro_batches, final=done)
                if not done and self.preemption.requested():
                    self._stop_for_preemption()
            if state.epoch_step == self.epoch_steps[state.epoch]:
                state.epoch += 1
                state.epoch_step = 0
        self._export()
        if distributed.is_main():
            self._write_summary(time.perf_counter() - started)
            self.logger.close()
        return self.history

    def _write_summary(self, wall_seconds: float) -> None:
        tokens_per_second, mfu_percent = self.metrics.run_means()
        last = self.history[-1] if self.history else {}
        summary = {"stage": self.stage.name, "final_loss": last.get("train/loss"), "eval_loss": last.get("eval/loss"),
                   "global_step": self.state.global_step, "tokens_seen": self.metrics.tokens_seen,
                   "skipped_steps": self.metrics.skipped_steps, "nonfinite_steps": self.metrics.nonfinite_steps,
                   "skipped_records": self.data.skipped_records,
                   "mean_tokens_per_second": tokens_per_second, "mean_mfu_percent": mfu_percent,
                   "wall_time_s": wall_seconds,
                   "eval": {key: value for key, value in last.items() if key.startswith("eval/")}}
        summary = finite_or_null(summary)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        print(f"[{self.stage.name}] done: {json.dumps(summary)}", flush=True)

