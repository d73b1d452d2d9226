"""--compile's speed-up: the same pretrain steps eager and with the transformer blocks compiled, interleaved.

    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 1 bench/compile.py --model small \\
        [--blocks 2 --steps_per_block 5] [any stage flag, e.g. --batch_size 8 --max_seq_len 256]

Two trainers in one process from the same seed, one eager and one with --compile. The compiled one's first step
is timed alone: it holds the compile (forward and backward graphs; a warm inductor cache in /tmp makes it
shorter). After one warm-up step each, blocks of --steps_per_block steps alternate between the two, the order
flipping each round so drift on a shared machine favours neither. Prints real tokens/s of each (the tokens that
are not padding, over the timed steps), their ratio, and the compile time. Metrics are off in both.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch.distributed as dist

from train import distributed
from train.config import parse_config
from train.stage import LanguageModelStage
from train.trainer import Trainer


def endless_batches(trainer: Trainer):
    epoch = 0
    while True:
        yield from trainer.data.train.iterate(epoch)
        epoch += 1


class TimedTrainer:
    def __init__(self, cfg):
        self.trainer = Trainer(LanguageModelStage("pretrain", data_kind="pretrain", default_packing="packed"), cfg)
        self.trainer.model.train()
        self.batches = endless_batches(self.trainer)
        self.seconds, self.tokens = 0.0, 0

    def step(self) -> float:
        """One optimizer step; returns its seconds and adds it to the totals."""
        micro_batches = [next(self.batches) for _ in range(self.trainer.cfg.accumulation_steps)]
        distributed.barrier()
        start = time.perf_counter()
        self.trainer.train_step(micro_batches)
        distributed.synchronize()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.tokens += sum(int((batch["doc_ids"] >= 0).sum()) for batch in micro_batches)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps_per_block", type=int, default=5)
    own, stage_args = parser.parse_known_args()
    defaults = dict(stage="pretrain", data_config="config/data/pretrain/demo.yaml", from_weight="none",
                    eval_interval=0, save_interval=0, metrics=False, out_dir="out/bench_compile", start_over=True)
    cfg = parse_config(defaults, stage_args)
    eager = TimedTrainer(dataclasses.replace(cfg, compile=False, out_dir=f"{cfg.out_dir}/eager"))
    compiled = TimedTrainer(dataclasses.replace(cfg, compile=True, out_dir=f"{cfg.out_dir}/compiled"))
    first_step = compiled.step()
    warm_step = compiled.step()
    eager.step()
    eager.seconds = compiled.seconds = 0.0
    eager.tokens = compiled.tokens = 0
    for block in range(own.blocks):
        for timed in ((eager, compiled) if block % 2 == 0 else (compiled, eager)):
            for _ in range(own.steps_per_block):
                timed.step()
    if distributed.is_main():
        trainer = eager.trainer
        rates = {name: timed.tokens / timed.seconds for name, timed in (("eager", eager), ("compiled", compiled))}
        steps = own.blocks * own.steps_per_block
        print(f"\ncompile: world {trainer.world_size}, {trainer.backend.describe()}, model {cfg.model}, "
              f"micro-batch {cfg.batch_size} x seq {trainer.data.seq_len}, accumulation {cfg.accumulation_steps}, "
              f"{steps} timed steps each")
        print(f"tokens/s eager {rates['eager']:.0f}, compiled {rates['compiled']:.0f}; "
              f"ratio compiled/eager {rates['compiled'] / rates['eager']:.3f}")
        print(f"compiled first step {first_step:.1f} s (the compile), second {warm_step:.2f} s; compile time "
              f"~{first_step - compiled.seconds / steps:.1f} s over a timed compiled step")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
