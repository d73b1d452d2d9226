"""Peak memory and step time of one training forward + backward with and without --activation_checkpointing and
--loss_chunk_tokens, at a few sequence lengths (the `small` preset, fp32, one CPU process per measurement).

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.memory [--preset small] [--seq_lens 512 1024 2048] [--rows 2]

Each configuration runs in a fresh process: a warm-up step, then the peak resident set (VmHWM, reset after the warm-up)
of one more step, less the resident set before it (weights, gradients), and the median
time of three steps. Prints the figures and each option's ratio to the plain step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# glibc serves tensors of 64 KiB and more from mmap and unmaps them when freed, so the resident set follows the live
# tensors; by default its threshold adapts and freed buffers stay resident, which made the peaks noise.
FIXED_MMAP_THRESHOLD = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
CONFIGS = {"plain": (False, 0), "checkpointing": (True, 0), "chunked loss": (False, 256),
           "both": (True, 256)}


def measure(preset: str, seq_len: int, rows: int, checkpointing: bool, chunk_tokens: int) -> dict:
    import torch

    from model import ModelConfig, Transformer
    from train.activation_checkpointing import checkpoint_blocks
    from train.metrics import peak_memory_gb, reset_peak_memory

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, max_seq_len=seq_len))
    if checkpointing:
        checkpoint_blocks(model)
    tokens = torch.randint(0, model.config.vocab_size, (rows, seq_len + 1))

    def step() -> float:
        start = time.perf_counter()
        output = model(tokens[:, :-1], return_hidden=True)
        logps, _ = model.label_logps(output.hidden.flatten(0, 1), tokens[:, 1:].flatten(), chunk_tokens)
        (-logps.mean()).backward()
        return time.perf_counter() - start

    step()
    if not reset_peak_memory():
        raise SystemExit("bench/memory.py measures a step's peak by resetting VmHWM, which needs Linux")
    before = resident_gb()
    seconds = [step()]
    peak = peak_memory_gb()[0] - before
    seconds += [step(), step()]
    return {"peak_gb": peak, "step_s": statistics.median(seconds)}


def resident_gb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args()
    if args.one:
        seq_len, name = args.one.split(":", 1)
        print(json.dumps(measure(args.preset, int(seq_len), args.rows, *CONFIGS[name])))
        return
    print(f"{args.preset}, {args.rows} rows, fp32: peak memory above the weights and gradients of one forward + "
          f"backward, median step time; chunked loss: {CONFIGS['chunked loss'][1]} positions a chunk")
    print(f"{'tokens':>6}  {'configuration':<14} {'peak MB':>8} {'× plain':>8} {'step s':>7} {'× plain':>8}")
    for seq_len in args.seq_lens:
        plain = None
        for name in CONFIGS:
            output = subprocess.run([sys.executable, "-m", "bench.memory", "--preset", args.preset, "--rows",
                                     str(args.rows), "--one", f"{seq_len}:{name}"], capture_output=True, text=True,
                                    check=True, env=FIXED_MMAP_THRESHOLD).stdout
            result = json.loads(output.strip().splitlines()[-1])
            plain = plain or result
            print(f"{seq_len * args.rows:>6}  {name:<14} {1000 * result['peak_gb']:>8.0f} "
                  f"{result['peak_gb'] / plain['peak_gb']:>8.2f} {result['step_s']:>7.2f} "
                  f"{result['step_s'] / plain['step_s']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
