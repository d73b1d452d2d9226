"""MFU of pretraining with packed rows against the machine's measured GEMM peak, and where the rest of the time goes.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 .venv/bin/deepspeed --num_gpus 1 bench/mfu.py \\
        [--timed_steps 8 --profiled_steps 2] [stage flags, e.g. --model small --batch_size 4 --max_seq_len 512]

Part 1 trains --timed_steps steps (after the throughput warm-up) through the trainer's own loop and reports the
MFU it logs: model FLOPs (train/flops.py, attention included) per second over the peak train/peak_flops.py measures
(the best 512^3-2048^3 GEMM rate of the training dtype on this process's threads, cached as the best seen).
Part 2 profiles --profiled_steps more steps with torch.profiler and splits their host time by operator kind:
GEMMs (mm, addmm, bmm: the work MFU counts, and the rate they themselves reach), attention, the optimizer and the
rest (norms, rotary, activations, cross-entropy, copies), so a gap to the target names its cause.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from train import distributed
from train.config import parse_config
from train.stage import LanguageModelStage
from train.trainer import Trainer

TARGET_MFU_PERCENT = 50.0
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def kind_of(op_name: str) -> str:
    if op_name in GEMM_OPS:
        return "gemm"
    if "attention" in op_name:
        return "attention"
    if "adam" in op_name.lower() or "_foreach_" in op_name or op_name.startswith("Optimizer."):
        return "optimizer"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--timed_steps", type=int, default=8)
    parser.add_argument("--profiled_steps", type=int, default=2)
    own, stage_args = parser.parse_known_args()
    defaults = dict(stage="pretrain", data_config="config/data/pretrain/demo.yaml", from_weight="none",
                    model="small", batch_size=4, packing="packed", eval_interval=0, save_interval=0,
                    out_dir="out/bench_mfu", start_over=True)
    cfg = parse_config(defaults, stage_args)
    cfg.max_steps = cfg.throughput_warmup_steps + own.timed_steps
    cfg.log_interval = cfg.max_steps  # one log line whose rate window is every step after the warm-up
    trainer = Trainer(LanguageModelStage("pretrain", data_kind="pretrain", default_packing="packed"), cfg)
    record = trainer.train()[-1]

    batches = trainer.data.train.iterate(0)
    trainer.model.train()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
        for _ in range(own.profiled_steps):
            trainer.train_step([next(batches) for _ in range(cfg.accumulation_steps)])
    seconds, flops = defaultdict(float), defaultdict(float)
    for event in profiler.key_averages():
        seconds[kind_of(event.key)] += event.self_cpu_time_total / 1e6
        flops[kind_of(event.key)] += event.flops or 0
    total = sum(seconds.values())

    peak = trainer.peak.flops_per_second
    mfu = record.get("train/mfu_percent")
    figures = {
        "model": cfg.model, "world_size": trainer.world_size, "threads": torch.get_num_threads(),
        "micro_batch": cfg.batch_size, "seq_len": trainer.data.seq_len, "dtype": trainer.backend.dtype,
        "peak_tflops": peak / 1e12 if peak else None, "peak_basis": trainer.peak.basis,
        "tokens_per_second": record.get("train/tokens_per_second"), "mfu_percent": mfu,
        "target_mfu_percent": TARGET_MFU_PERCENT,
        "time_share_percent": {kind: 100 * s / total for kind, s in sorted(seconds.items())},
        "gemm_tflops": flops["gemm"] / seconds["gemm"] / 1e12 if seconds["gemm"] else None,
    }
    figures["gemm_percent_of_peak"] = (100 * figures["gemm_tflops"] * 1e12 / peak
                                       if peak and figures["gemm_tflops"] else None)
    if distributed.is_main():
        print(f"\nMFU benchmark: {json.dumps(figures, indent=1)}")
        verdict = "meets" if mfu is not None and mfu >= TARGET_MFU_PERCENT else "misses"
        print(f"MFU {mfu if mfu is None else round(mfu, 1)}% {verdict} the {TARGET_MFU_PERCENT:.0f}% target; "
              f"GEMMs take {figures['time_share_percent'].get('gemm', 0):.0f}% of the profiled step time and run at "
              f"{figures['gemm_percent_of_peak'] or float('nan'):.0f}% of the measured peak")
        (trainer.out_dir / "mfu.json").write_text(json.dumps(figures, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
