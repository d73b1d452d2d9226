"""Padded vs packed rows for SFT and DPO on the demo data: padding fraction and real (non-padding) tokens/s.

    .venv/bin/python bench/padding.py [--model tiny --rows 8 --max_seq_len 256 --steps 20 --warmup 3]

Each run is a stage script under the deepspeed launcher with one CPU rank (DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1,
ZeRO-0), fresh weights of --model, the data configs launch/run_pipeline.sh trains on, one after the other. Both
packings get the same rows of --max_seq_len tokens per micro-batch: SFT --rows documents (padded) or rows of packed
documents; DPO --rows / 2 pairs (padded: a chosen and a rejected row each) or --rows rows of whole packed pairs.
Real tokens/s is the input tokens that are not padding over the timed steps (after --warmup), from metrics.jsonl;
the padding fraction is the loader's, from run_config.json (padded DPO then drops the columns every row pads, so
it computes on fewer positions than that fraction suggests).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from train.config import REPO_ROOT
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STAGES = {"sft": "config/data/posttrain/sft/general.yaml", "dpo": "config/data/posttrain/dpo/demo.yaml"}


def run(stage: str, packing: str, args, out_dir: Path) -> dict:
    batch_size = args.rows // 2 if stage == "dpo" and packing == "padded" else args.rows
    command = [str(DEEPSPEED), "--num_gpus", "1", "--master_port", str(args.master_port),
               str(REPO_ROOT / "train" / f"{stage}.py"), "--deepspeed", "ds_configs/zero0.json",
               "--out_dir", str(out_dir), "--data_config", STAGES[stage], "--from_weight", "none",
               "--model", args.model, "--packing", packing, "--batch_size", str(batch_size),
               "--max_seq_len", str(args.max_seq_len), "--max_steps", str(args.warmup + args.steps),
               "--throughput_warmup_steps", str(args.warmup), "--log_interval", "1", "--eval_interval", "0",
               "--eval_batches", "1", "--save_interval", "0", "--seed", "42"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{stage} --packing {packing} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                 f"{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    records = [record for record in records if "train/global_step" in record]
    timed = [record for record in records if record["train/global_step"] > args.warmup]
    if len(timed) != args.steps:
        sys.exit(f"{out_dir / 'metrics.jsonl'}: {len(timed)} timed steps logged, expected {args.steps}")
    tokens = timed[-1]["train/num_input_tokens_seen"] - records[args.warmup - 1]["train/num_input_tokens_seen"]
    seconds = sum(record["system/step_time_s"] for record in timed)
    data = json.loads((out_dir / "run_config.json").read_text())["data"]
    return {"padding_fraction": data["padding_fraction"], "batch_size": batch_size, "tokens": tokens,
            "seconds": seconds, "real_tokens_per_second": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model preset (fresh weights)")
    parser.add_argument("--rows", type=int, default=8, help="rows of --max_seq_len tokens per micro-batch (even)")
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (>= 1)")
    parser.add_argument("--master_port", type=int, default=29533)
    args = parser.parse_args()
    if args.rows < 2 or args.rows % 2 or args.warmup < 1 or args.steps < 1:
        parser.error("--rows must be even and >= 2, --warmup and --steps >= 1")
    print(f"model {args.model}, {args.rows} rows x {args.max_seq_len} tokens a micro-batch, one CPU rank, "
          f"{args.steps} timed steps after {args.warmup}")
    with tempfile.TemporaryDirectory(prefix="bench_padding_") as scratch:
        for stage in STAGES:
            results = {packing: run(stage, packing, args, Path(scratch) / f"{stage}_{packing}")
                       for packing in ("padded", "packed")}
            for packing, result in results.items():
                print(f"{stage:4} {packing:7} --batch_size {result['batch_size']:3}  padding "
                      f"{result['padding_fraction']:6.1%}  real tokens/s {result['real_tokens_per_second']:9.0f}  "
                      f"({result['tokens']} tokens in {result['seconds']:.2f} s)")
            ratio = results["packed"]["real_tokens_per_second"] / results["padded"]["real_tokens_per_second"]
            print(f"{stage:4} packed / padded real tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
