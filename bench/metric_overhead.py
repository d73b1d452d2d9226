"""Metric overhead: the same training steps with the full metric set vs. metrics off, interleaved.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/deepspeed --num_gpus 2 bench/metric_overhead.py \\
        [--blocks 6 --steps_per_block 20] [any stage flag, e.g. --deepspeed ds_configs/zero2.json --model small]

One engine trains throughout; blocks of steps alternate between metrics on (per-micro-batch counts, FLOPs,
device accumulation, a log line every --log_interval steps with its one all-gather, console and JSONL) and
off, the order flipping each round so drift favours neither. Prints each block's step time and the median
on/off ratio (target <= 1.01).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch.distributed as dist

from train import distributed
from train.config import parse_config
from train.stage import LanguageModelStage
from train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps_per_block", type=int, default=20)
    own, stage_args = parser.parse_known_args()
    defaults = dict(stage="pretrain", data_config="config/data/pretrain/demo.yaml", from_weight="none",
                    eval_interval=0, save_interval=0, out_dir="out/bench_metric_overhead", start_over=True)
    cfg = parse_config(defaults, stage_args)
    trainer = Trainer(LanguageModelStage("pretrain", data_kind="pretrain", default_packing="packed"), cfg)

    def endless_batches():
        epoch = 0
        while True:
            yield from trainer.data.train.iterate(epoch)
            epoch += 1

    batches = endless_batches()
    trainer.model.train()
    trainer.metrics.start_epoch()

    def train_step() -> None:
        # The loop of Trainer.train, on endless batches: the step count only feeds the log schedule.
        trainer.step([next(batches) for _ in range(cfg.accumulation_steps)])

    def run_block(metrics_on: bool) -> float:
        trainer.cfg.metrics = trainer.metrics.enabled = metrics_on
        distributed.barrier()
        distributed.synchronize()
        start = time.perf_counter()
        for _ in range(own.steps_per_block):
            train_step()
        distributed.synchronize()
        distributed.barrier()
        return (time.perf_counter() - start) / own.steps_per_block

    for _ in range(cfg.throughput_warmup_steps):  # warm-up, measured by neither side
        train_step()
    times = {True: [], False: []}
    for block in range(own.blocks):
        for metrics_on in ((True, False) if block % 2 == 0 else (False, True)):
            times[metrics_on].append(run_block(metrics_on))
    if distributed.is_main():
        ratios = [on / off for on, off in zip(times[True], times[False])]
        print(f"\nmetric overhead: world {trainer.world_size}, {trainer.backend.describe()}, model "
              f"{cfg.model}, micro-batch {cfg.batch_size} x seq {trainer.data.seq_len}, accumulation "
              f"{cfg.accumulation_steps}, log every {cfg.log_interval} steps")
        print("block step time (ms), metrics on : " + " ".join(f"{t * 1e3:.1f}" for t in times[True]))
        print("block step time (ms), metrics off: " + " ".join(f"{t * 1e3:.1f}" for t in times[False]))
        print(f"median step time on {statistics.median(times[True]) * 1e3:.2f} ms, off "
              f"{statistics.median(times[False]) * 1e3:.2f} ms; median ratio on/off {statistics.median(ratios):.4f} "
              f"(target <= 1.01)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
