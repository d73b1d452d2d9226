"""The same stage, model, data, seed and global batch for a fixed number of steps under each ZeRO stage, the
offload variants and FSDP2, side by side.

    bash launch/compare_zero.sh [stage] [--configs 0,1,2,3,2_offload,3_offload,fsdp] [--steps 10] [stage flags]
    python -m bench.compare pretrain --model tiny --steps 4

Each configuration runs through launch/run_<stage>.sh (the deepspeed launcher, or torchrun for `fsdp`) with
NUM_GPUS ranks. The table's rates are those of the last metric line: by default (--log_interval = --steps) one
line whose window covers every step after the warm-up.
The results folder holds runs/<config>/ (each run's metrics.jsonl, run_config.json, ...), runs/<config>.log,
results.json (the raw figures), results.md (the table) and results.png (throughput and memory per configuration).

The optimisation is the same in every configuration, so the loss and grad norm of every logged step must agree
with the first configuration's within the tolerance of the precision; a row that does not is flagged, and the tool
exits 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from train.config import REPO_ROOT
CONFIGS = ["0", "1", "2", "3", "2_offload", "3_offload", "fsdp"]
STAGES = ["pretrain", "midtrain", "sft", "dpo", "reward", "ppo", "grpo"]
# Relative agreement expected of the last step's loss and grad norm: fp32 runs differ only in summation order
# (and DeepSpeed's fp32 norm reduction, seen 6e-5 off a float64 one); bf16 rounds every matmul.
TOLERANCES = {"fp32": {"loss": 1e-4, "grad_norm": 1e-3}, "bf16": {"loss": 2e-2, "grad_norm": 5e-2},
              "fp16": {"loss": 2e-2, "grad_norm": 5e-2}}
FIGURES = [("tokens_per_second", "train/tokens_per_second"), ("mfu_percent", "train/mfu_percent"),
           ("tflops_per_device", "train/tflops_per_device"), ("step_time_s", "system/step_time_s"),
           ("peak_memory_gb", "system/peak_memory_gb"), ("loss", "train/loss"), ("grad_norm", "train/grad_norm")]


def label(config: str) -> str:
    if config == "fsdp":
        return "FSDP2"
    stage, _, offload = config.partition("_")
    return f"ZeRO-{stage}" + (" offload" if offload else "")


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(usage="%(prog)s [stage] [options] [stage flags]", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    argv = list(sys.argv[1:] if argv is None else argv)
    # The stage is only ever the first argument: a positional parsed among unknown stage flags would take their values.
    stage = argv.pop(0) if argv and not argv[0].startswith("-") else "pretrain"
    if stage not in STAGES:
        parser.error(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, the first is the reference; choices: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per configuration")
    parser.add_argument("--warmup_steps", type=int, default=2, help="first steps left out of the rates")
    parser.add_argument("--log_interval", type=int, default=0, help="steps between metric lines (0: --steps)")
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch_size", type=int, default=4, help="micro-batch per rank")
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--out", default="", help="results folder (default out/compare_zero/<stage>)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one configuration may run")
    args, stage_flags = parser.parse_known_args(argv)
    args.stage = stage
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        parser.error(f"--configs: {', '.join(unknown) or 'none given'} not among {', '.join(CONFIGS)}")
    if len(set(configs)) != len(configs):
        parser.error(f"--configs: {args.configs} names a configuration twice")
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps {args.steps} must exceed --warmup_steps {args.warmup_steps}: no step would be timed")
    for flag in ("--out_dir", "--max_steps", "--deepspeed", "--backend", "--throughput_warmup_steps",
                 "--log_interval"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in stage_flags):
            parser.error(f"{flag} is set by the tool for each configuration; use --out, --steps, --configs "
                         f"--warmup_steps or --log_interval")
    args.configs = configs
    args.log_interval = args.log_interval or args.steps
    args.out = Path(args.out or REPO_ROOT / "out" / "compare_zero" / args.stage).resolve()
    return args, stage_flags


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(config: str, args: argparse.Namespace, stage_flags: list[str]) -> dict:
    """One configuration through the launch script; its last metric line and run config, or the failure."""
    run_dir = args.out / "runs" / config
    log = args.out / "runs" / f"{config}.log"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    if config == "fsdp":
        env["BACKEND"] = "fsdp"
    else:
        env.update(BACKEND="deepspeed", ZERO_STAGE=config)
    # Evaluation and saving only at the end (outside the rate window), unless the stage flags say otherwise.
    command = ["bash", f"launch/run_{args.stage}.sh", "--model", args.model, "--batch_size", str(args.batch_size),
               "--max_seq_len", str(args.max_seq_len), "--eval_interval", "0", "--eval_batches", "1",
               "--save_interval", "0", *stage_flags, "--max_steps", str(args.steps),
               "--throughput_warmup_steps", str(args.warmup_steps), "--log_interval", str(args.log_interval),
               "--out_dir", str(run_dir)]
    result = {"config": config, "label": label(config), "command": command,
              "environment": {key: env[key] for key in ("BACKEND", "ZERO_STAGE") if key in env},
              "run_dir": str(run_dir), "log": str(log)}
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            status = f"ran past {args.timeout}s"
        except BaseException:  # interrupted: the run's ranks are in their own session and would outlive the tool
            os.killpg(process.pid, 9)
            raise
    result["wall_time_s"] = time.perf_counter() - started
    metrics = run_dir / "metrics.jsonl"
    if status != 0 or not metrics.is_file():
        result["error"] = f"exit {status}; see {log}"
        return result
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = records[-1]
    run = json.loads((run_dir / "run_config.json").read_text())
    result.update({name: last.get(key) for name, key in FIGURES})
    result["curve"] = [{"step": r["train/global_step"], "loss": r["train/loss"], "grad_norm": r["train/grad_norm"]}
                       for r in records]
    result.update(step=last["train/global_step"], dtype=run["dtype"], world_size=run["world_size"],
                  global_batch=run["global_batch_size"], parameters=run["parameters"],
                  peak_flops=run["peak_flops"])
    return result


def largest_relative_difference(curve: list[dict], reference: list[dict], key: str) -> Optional[float]:
    """Over the logged steps of both curves; None when a value is unknown."""
    differences = []
    for ours, theirs in zip(curve, reference):
        if ours[key] is None or theirs[key] is None:
            return None
        differences.append(abs(ours[key] - theirs[key]) / max(abs(theirs[key]), 1e-12))
    return max(differences)


def check_agreement(results: list[dict]) -> None:
    """Mark each row's loss and grad norm curves against the first successful row's (the reference)."""
    ran = [r for r in results if "error" not in r]
    if not ran:
        return
    reference = ran[0]
    tolerance = TOLERANCES[reference["dtype"]]
    for row in ran:
        problems = []
        if ([p["step"] for p in row["curve"]], row["global_batch"]) != \
                ([p["step"] for p in reference["curve"]], reference["global_batch"]):
            problems.append("different steps or global batch")
        for key in ("loss", "grad_norm"):
            diff = largest_relative_difference(row["curve"], reference["curve"], key)
            row[f"{key}_relative_difference"] = diff
            if diff is None:
                problems.append(f"{key} unknown")
            elif diff > tolerance[key]:
                problems.append(f"{key} off by {diff:.1e}")
        row["agrees"] = not problems
        row["disagreement"] = "; ".join(problems) or None


def cell(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def table(results: list[dict], meta: dict) -> str:
    reference = meta["reference"]
    rows = [f"| configuration | tokens/s | MFU % | TFLOP/s per device | step time (s) | peak memory per rank (GB) "
            f"| loss at step {meta['steps']} | grad norm at step {meta['steps']} | agrees with {reference} |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['label']} | failed: {r['error']} | | | | | | | |")
            continue
        agrees = "yes" if r["agrees"] else f"**NO: {r['disagreement']}**"
        rows.append(f"| {r['label']} | {cell(r['tokens_per_second'], ',.0f')} | {cell(r['mfu_percent'], '.2f')} "
                    f"| {cell(r['tflops_per_device'], '.4f')} | {cell(r['step_time_s'], '.3f')} "
                    f"| {cell(r['peak_memory_gb'], '.3f')} | {cell(r['loss'], '.6f')} | {cell(r['grad_norm'], '.6f')} "
                    f"| {agrees} |")
    return "\n".join(rows)


def markdown(results: list[dict], meta: dict) -> str:
    tolerance = TOLERANCES.get(meta["dtype"], {})
    verdict = ("All configurations agree on the loss and grad norm of every logged step"
               if all(r.get("agrees") for r in results) else
               "**Some configurations disagree or failed (flagged in the table)**")
    return "\n".join([
        f"# {meta['stage']}: ZeRO stages, offload and FSDP2 side by side", "",
        f"Model `{meta['model']}` ({meta['parameters']:,} parameters), {meta['world_size']} ranks on "
        f"{meta['device']}, {meta['dtype']}, global batch {meta['global_batch']} rows of up to "
        f"{meta['max_seq_len']} tokens, {meta['steps']} steps (rates over the last "
        f"{meta['steps'] - meta['warmup_steps']}, after {meta['warmup_steps']} warm-up steps), seed and data the "
        f"same in every run. Command: `{meta['command']}`.", "",
        table(results, meta), "",
        f"{verdict} (reference: {meta['reference']}; largest relative difference allowed {tolerance.get('loss')} on "
        f"the loss, {tolerance.get('grad_norm')} on the grad norm for {meta['dtype']}).", "",
        "Rates, MFU and step time come from each run's metric line at the last step (docs/metrics.md). Peak memory is "
        "`system/peak_memory_gb`, the largest over the ranks of each rank's own peak: CUDA `max_memory_allocated` on "
        "GPUs; on CPU the rank process's peak resident set size, which also holds the interpreter, the libraries and "
        "their buffers, not only model state.", "",
        "Raw figures (with each run's logged loss and grad norm curve): `results.json`; chart: `results.png`; "
        "each run's output: `runs/<config>/`, its log `runs/<config>.log`.", ""])


def chart(results: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    ran = [r for r in results if "error" not in r]
    labels = [r["label"] + ("" if r["agrees"] else " (DIFFERS)") for r in ran]
    colors = ["tab:orange" if r["config"] == "fsdp" else "tab:blue" for r in ran]
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(ran) + 2), sharey=True)
    panels = [("tokens_per_second", "tokens/s (higher is better)", ",.0f"),
              ("peak_memory_gb", "peak memory per rank, GB (lower is better)", ".2f")]
    for axis, (key, title, spec) in zip(axes, panels):
        values = [r[key] if r[key] is not None else 0.0 for r in ran]
        bars = axis.barh(labels, values, color=colors)
        for bar, r in zip(bars, ran):
            axis.annotate(cell(r[key], spec), (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                          xytext=(3, 0), textcoords="offset points", va="center", fontsize=9)
        axis.set_title(title, fontsize=10)
        axis.margins(x=0.2)
    axes[0].invert_yaxis()
    figure.suptitle(f"{meta['stage']}, model {meta['model']}, {meta['world_size']} ranks on {meta['device']}, "
                    f"{meta['dtype']}, global batch {meta['global_batch']}, {meta['steps']} steps", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}× {torch.cuda.get_device_name()}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: Optional[list[str]] = None) -> int:
    args, stage_flags = parse_args(argv)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    results = []
    for config in args.configs:
        print(f"[compare] {label(config)} ...", flush=True)
        results.append(run_config(config, args, stage_flags))
        r = results[-1]
        print(f"[compare] {label(config)}: " + (r["error"] if "error" in r else
              f"{cell(r['tokens_per_second'], ',.0f')} tokens/s, loss {cell(r['loss'], '.6f')}, "
              f"grad norm {cell(r['grad_norm'], '.6f')}"), flush=True)
    check_agreement(results)
    ran = [r for r in results if "error" not in r]
    first = ran[0] if ran else {}
    meta = {"stage": args.stage, "model": args.model, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "max_seq_len": args.max_seq_len, "stage_flags": stage_flags, "device": device_name(),
            "world_size": first.get("world_size"), "dtype": first.get("dtype"),
            "global_batch": first.get("global_batch"), "parameters": first.get("parameters"),
            "reference": first.get("label"),
            "command": " ".join(["bash launch/compare_zero.sh", *(sys.argv[1:] if argv is None else argv)]),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if ran:
        (args.out / "results.md").write_text(markdown(results, meta))
        chart(results, meta, args.out / "results.png")
        print(table(results, meta))
    print(f"[compare] results in {args.out}", flush=True)
    return 0 if ran and all(r.get("agrees") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
