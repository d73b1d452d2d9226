"""The first run on a GPU, as one command: what the device is and how zerostage measures it, then short pretrain and
SFT runs of the `small` and `base` presets in bf16 under ZeRO-2, ZeRO-3 and FSDP, their loss curves checked against
each other, and tokens/s, MFU and peak memory per configuration as a table (docs/gpu.md).

    make gpu-check                                  # one GPU, about 5 minutes on an H100/H200
    .venv/bin/python -m bench.gpu_check --dry_run   # the same steps on CPU ranks (tiny preset): what CI runs

Each configuration is a stage script run as its own single process (the README's one-GPU form), so a crash or an
out-of-memory in one is reported and the others still run. Nothing is installed: it uses what `make setup` did.
Exit status: 0 when every run finished and every curve agrees, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"zero2": ["--deepspeed", "ds_configs/zero2.json"], "zero3": ["--deepspeed", "ds_configs/zero3.json"],
            "fsdp": ["--backend", "fsdp"]}
# bf16 keeps 8 bits of mantissa: one rounding is 2^-9 ≈ 0.2% relative. The backends run the same fp32 master
# weights, fp32 gradient reduction and bf16 matmuls, but in different orders (ZeRO-3 and FSDP gather and reduce
# per block), so each step's loss may differ by a few roundings, compounding over the steps: 2% bounds a few dozen.
LOSS_TOLERANCE = 0.02


def describe_device(dtype: str) -> list[str]:
    """The device, its identified peaks and the attention kernel a training forward takes."""
    from model.attention import flash_attn_func, resolve_impl
    from train.backend import resolve_dtype
    from train.peak_flops import device_peak, peak_memory_bandwidth

    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda}, flash-attn "
             f"{'installed' if flash_attn_func is not None else 'not installed'}"]
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, "
                     f"compute capability {props.major}.{props.minor}")
    else:
        lines.append("device: CPU (no CUDA device): a dry run")
    resolved = resolve_dtype(dtype, "deepspeed")
    peak = device_peak(resolved, None, REPO_ROOT / ".cache")
    bandwidth = peak_memory_bandwidth(device, None, REPO_ROOT / ".cache")
    lines.append(f"precision: --dtype {dtype} -> {resolved}; peak: "
                 f"{'unknown' if peak.flops_per_second is None else f'{peak.flops_per_second / 1e12:.4g} TFLOP/s'} "
                 f"({peak.basis}); memory bandwidth: "
                 f"{'unknown' if bandwidth is None else f'{bandwidth / 1e9:.4g} GB/s'}")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolved]
    q = torch.zeros(1, 256, 8, 64, device=device, dtype=torch_dtype)
    kernel = {"flash": "flash-attn (rows of one document: flash_attn_func; packed documents: its varlen kernel)",
              "sdpa": "SDPA (rows of one document: is_causal, no mask; packed documents: causal SDPA per document)"}
    lines.append(f"attention (attn_impl auto, a training forward): {kernel[resolve_impl('auto', q, q)]}")
    return lines


def run(stage: str, preset: str, backend: str, args, out_dir: Path) -> dict:
    """One configuration as a single process; its metric lines, or the error it ended with."""
    command = [sys.executable, str(REPO_ROOT / "train" / f"{stage}.py"), *BACKENDS[backend], "--model", preset,
               "--dtype", args.dtype, "--max_steps", str(args.steps), "--batch_size", str(args.batch_size),
               "--log_interval", "1", "--eval_interval", "0", "--eval_batches", "0", "--save_interval", "0",
               "--throughput_warmup_steps", str(args.warmup), "--from_weight", "none", "--learning_rate", "3e-4",
               "--out_dir", str(out_dir), "--start_over"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if args.dry_run:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-8:]
        return {"error": f"exit {result.returncode}: " + " | ".join(tail), "seconds": seconds}
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["train/tokens_per_second"] is not None]

    def mean(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.mean(values) if values else None

    return {"loss": [r["train/loss"] for r in records], "tokens_per_second": mean("train/tokens_per_second"),
            "mfu_percent": mean("train/mfu_percent"),
            "peak_memory_gb": max((r["system/peak_memory_gb"] for r in records
                                   if r.get("system/peak_memory_gb") is not None), default=None),
            "peak_reserved_gb": max((r["system/peak_memory_reserved_gb"] for r in records
                                     if r.get("system/peak_memory_reserved_gb") is not None), default=None),
            "seconds": seconds}


def curve_difference(losses: list, reference: list) -> float:
    """The largest relative difference of two loss curves, step by step (inf when either is incomplete)."""
    if len(losses) != len(reference) or not losses or any(not math.isfinite(x) for x in losses + reference):
        return math.inf
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="CPU ranks, the tiny preset, a few steps")
    parser.add_argument("--presets", default=None, help="comma-separated (default: small,base; dry run: tiny)")
    parser.add_argument("--stages", default="pretrain,sft")
    parser.add_argument("--backends", default="zero2,zero3,fsdp")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 30; dry run 3)")
    parser.add_argument("--batch_size", type=int, default=None, help="rows per step (default 16; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the rates (default 5; dry run 1)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one run may take")
    parser.add_argument("--out", default="", help="where the runs write (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench.gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "use --dry_run for the CPU rehearsal", file=sys.stderr)
        return 2
    presets = (args.presets or ("tiny" if args.dry_run else "small,base")).split(",")
    args.steps = args.steps or (3 if args.dry_run else 30)
    args.batch_size = args.batch_size or (2 if args.dry_run else 16)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)
    backends = args.backends.split(",")
    for line in describe_device(args.dtype):
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        rows, failures = [], []
        for stage in args.stages.split(","):
            for preset in presets:
                results = {}
                for backend in backends:
                    results[backend] = run(stage, preset, backend, args, root / f"{stage}-{preset}-{backend}")
                    print(f"  {stage} {preset} {backend}: "
                          f"{results[backend].get('error') or 'done'} ({results[backend]['seconds']:.0f} s)",
                          flush=True)
                reference = results[backends[0]].get("loss", [])
                for backend, result in results.items():
                    difference = curve_difference(result.get("loss", []), reference) if "error" not in result else None
                    if "error" in result:
                        failures.append(f"{stage} {preset} {backend}: {result['error']}")
                    elif difference > LOSS_TOLERANCE:
                        failures.append(f"{stage} {preset} {backend}: loss curve differs from {backends[0]}'s by "
                                        f"{difference:.2%} (tolerance {LOSS_TOLERANCE:.0%})")
                    rows.append((stage, preset, backend, result, difference))

    print(f"\n| stage | preset | backend | final loss | vs {backends[0]} | tokens/s | MFU % | peak GB (reserved) |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, preset, backend, result, difference in rows:
        final = result["loss"][-1] if result.get("loss") else None
        print(f"| {stage} | {preset} | {backend} | {cell(final, '.4f')} | "
              f"{'failed' if difference is None else f'{difference:.2%}'} | "
              f"{cell(result.get('tokens_per_second'), ',.0f')} | {cell(result.get('mfu_percent'), '.1f')} | "
              f"{cell(result.get('peak_memory_gb'), '.2f')} ({cell(result.get('peak_reserved_gb'), '.2f')}) |")
    for failure in failures:
        print(f"FAILED: {failure}")
    print("gpu check: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
