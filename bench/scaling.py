"""Cost as the work grows, predicted then measured: tokens/s, MFU and peak memory per rank at 2 CPU ranks for longer
sequences (the `small` preset, packed pretrain rows of 256 → 4096 tokens) and bigger models (tiny → base at 512),
under ZeRO-2, ZeRO-3 and FSDP2, each beside bench/plan.py's prediction and its error.

    .venv/bin/python -m bench.scaling [--quick] [--backends zero2,zero3,fsdp] [--steps 3]

Each configuration is a few steps of launch/run_pretrain.sh (1 row per rank, 1 thread per rank, fp32, the demo
corpus); its figures are the one metric line's (docs/metrics.md): the rates over the steps after the first, the peak
resident set (system/peak_memory_gb, VmHWM) over all of them. A CPU process's resident set also holds the
interpreter, torch, DeepSpeed, its shared-memory collectives and the data, which the plan does not model: a probe
launched the same way (launcher, imports, process group, data, the backend's engine and one step, a model of a few
hundred parameters) measures that baseline once per backend, and the prediction is baseline + the plan's peak. The
error is reported on the whole and on the part above the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.compare import free_port
from bench.plan import Job, load_config, plan
from train.config import REPO_ROOT

OUT = REPO_ROOT / "out" / "bench_scaling"
BACKENDS = ("zero2", "zero3", "fsdp")
SEQ_SWEEP = [("small", 256), ("small", 1024), ("small", 4096)]
MODEL_SWEEP = [("tiny", 512), ("small", 512), ("minimind3", 512), ("base", 512)]
QUICK = [("small", 256), ("small", 4096), ("base", 512)]
# glibc serves tensors of 64 KiB and more from mmap and unmaps them when freed, so the resident set follows the live
# tensors (bench/memory.py measured the same); with its adaptive threshold freed buffers stay resident and the peak
# tells more about malloc than about the training step.
ENV = {"PYTHONPATH": str(REPO_ROOT), "NUM_GPUS": "2", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "DS_ACCELERATOR": "cpu"}


def environment(backend: str) -> dict:
    env = {**os.environ, **ENV, "MASTER_PORT": str(free_port())}
    if backend == "fsdp":
        env["BACKEND"] = "fsdp"
    else:
        env.update(BACKEND="deepspeed", ZERO_STAGE=backend.removeprefix("zero"))
    return env


def launch(command: list[str], env: dict, log: Path, timeout: int) -> int | str:
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            return f"ran past {timeout}s"
        except BaseException:  # the ranks are in their own session and would outlive the tool
            os.killpg(process.pid, 9)
            raise


def baseline_gb(backend: str, timeout: int) -> float:
    """Resident set of a rank that has done everything a run does but with a model of a few hundred parameters:
    launcher, imports, process group, tokenizer and data, the backend's engine and one training step (DeepSpeed's
    shared-memory collectives, the optimizer's objects); max over the ranks."""
    env = environment(backend)
    launcher = (["torchrun", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"]] if backend == "fsdp"
                else ["deepspeed", "--num_gpus", "2", "--master_port", env["MASTER_PORT"]])
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"baseline_{backend}.log"
    status = launch([str(REPO_ROOT / ".venv" / "bin" / launcher[0]), *launcher[1:], str(Path(__file__)),
                     "--probe", backend], env, log, timeout)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{\"baseline_gb\"")]
    if status != 0 or not lines:
        raise SystemExit(f"baseline probe failed ({status}); see {log}")
    return json.loads(lines[-1])["baseline_gb"]


def probe(backend: str) -> None:
    """Run under a launcher: the start of a run and one step of a model of a few hundred parameters, then the
    resident set (max over ranks)."""
    import torch
    import torch.distributed as dist

    from model import ModelConfig, Transformer
    from train import distributed
    from train.backend import build_backend
    from train.config import parse_config
    from train.data_loading import build_data
    from train.stage import LanguageModelStage

    distributed.init_distributed()
    flags = ["--backend", "fsdp"] if backend == "fsdp" else ["--deepspeed", f"ds_configs/zero{backend[-1]}.json"]
    cfg = parse_config(dict(stage="pretrain", data_config="config/data/pretrain/demo.yaml", from_weight="none",
                            max_seq_len=512, out_dir=str(OUT / "probe")), flags)
    stage = LanguageModelStage("pretrain", data_kind="pretrain", default_packing="packed")
    data = build_data(cfg, stage, ModelConfig.from_preset("small"), distributed.rank(), distributed.world_size())
    next(data.train.iterate(0))
    speck = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=8)
    model = build_backend(cfg, distributed.world_size()).wrap(Transformer(speck), cfg, total_steps=1)
    model.backward(model(torch.zeros(1, 8, dtype=torch.long, device=distributed.device())).logits.sum())
    model.step()
    with open("/proc/self/status") as status:
        resident = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024 / 1e9
    peak = torch.tensor([resident])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if distributed.is_main():
        print(json.dumps({"baseline_gb": float(peak)}), flush=True)
    dist.destroy_process_group()


def model_directory(model: str, seq_len: int) -> Path:
    """The preset as a --model directory whose max_seq_len admits the row length (the presets stop at 512-768)."""
    directory = OUT / "models" / f"{model}_{seq_len}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(load_config(model, seq_len).to_dict()))
    return directory


def run(model: str, seq_len: int, backend: str, args) -> dict:
    name = f"{backend}_{model}_{seq_len}"
    run_dir = OUT / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = ["bash", "launch/run_pretrain.sh", "--model", str(model_directory(model, seq_len)), "--batch_size", "1", "--max_seq_len", str(seq_len),
               "--max_steps", str(args.steps), "--throughput_warmup_steps", "1", "--log_interval", str(args.steps),
               "--eval_interval", "0", "--save_interval", "0", "--out_dir", str(run_dir)]
    started = time.perf_counter()
    status = launch(command, environment(backend), OUT / "runs" / f"{name}.log", args.timeout)
    result = {"name": name, "model": model, "seq_len": seq_len, "backend": backend,
              "wall_s": time.perf_counter() - started, "load": os.getloadavg()[0]}
    metrics = run_dir / "metrics.jsonl"
    if status != 0 or not metrics.is_file():
        return {**result, "error": f"exit {status}; see {OUT / 'runs' / f'{name}.log'}"}
    line = json.loads(metrics.read_text().splitlines()[-1])
    return {**result, "tokens_per_second": line["train/tokens_per_second"], "mfu_percent": line["train/mfu_percent"],
            "peak_gb": line["system/peak_memory_gb"]}


def predict(result: dict, baseline: float) -> dict:
    job = Job(load_config(result["model"], result["seq_len"]), 2, result["backend"], 1, result["seq_len"],
              "fp32", device="cpu")
    model_gb = plan(job).peak / 1e9
    return {"plan_gb": model_gb, "baseline_gb": baseline, "predicted_gb": baseline + model_gb}


def table(results: list[dict]) -> str:
    rows = ["| backend | model | tokens/row | tokens/s | × first | MFU % | load | peak GB measured | predicted | error "
            "| above baseline: measured | plan | error |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first = {}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['backend']} | {r['model']} | {r['seq_len']} | failed: {r['error']} ||||||||")
            continue
        key = (r["backend"], r["sweep"])
        first.setdefault(key, r["tokens_per_second"])
        above = r["peak_gb"] - r["baseline_gb"]
        rows.append(
            f"| {r['backend']} | {r['model']} | {r['seq_len']} | {r['tokens_per_second']:,.0f} "
            f"| {r['tokens_per_second'] / first[key]:.2f} | {r['mfu_percent']:.1f} | {r['load']:.1f} | {r['peak_gb']:.3f} "
            f"| {r['predicted_gb']:.3f} | {100 * (r['predicted_gb'] / r['peak_gb'] - 1):+.0f}% | {above:.3f} "
            f"| {r['plan_gb']:.3f} | {100 * (r['plan_gb'] / above - 1):+.0f}% |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK} (model, tokens a row)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration; the rates skip the first")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one configuration may run")
    parser.add_argument("--table", action="store_true",
                        help="no runs: the last results.json's measurements beside the current plan's predictions")
    parser.add_argument("--probe", choices=BACKENDS, help=argparse.SUPPRESS)  # internal: a baseline rank
    parser.add_argument("--local_rank", help=argparse.SUPPRESS)  # the deepspeed launcher's, for the probe
    args = parser.parse_args()
    if args.probe:
        probe(args.probe)
        return
    if args.table:
        saved = json.loads((OUT / "results.json").read_text())
        report(saved["results"], saved["baselines_gb"])
        return
    backends = [b.strip() for b in args.backends.split(",")]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: {', '.join(sorted(unknown))} not among {', '.join(BACKENDS)}")
    sweeps = [("model", c) for c in QUICK] if args.quick else \
        [("seq", c) for c in SEQ_SWEEP] + [("model", c) for c in MODEL_SWEEP]
    baselines = {}
    results = []
    for backend in backends:
        baselines[backend] = baseline_gb(backend, args.timeout)
        print(f"[scaling] baseline resident set under {backend}: {baselines[backend]:.3f} GB", flush=True)
        for sweep, (model, seq_len) in sweeps:
            result = {**run(model, seq_len, backend, args), "sweep": sweep}
            results.append(result)
            print(f"[scaling] {result['name']}: " + (result.get("error") or
                  f"{result['tokens_per_second']:,.0f} tokens/s, MFU {result['mfu_percent']:.1f}%, peak "
                  f"{result['peak_gb']:.3f} GB ({result['wall_s']:.0f} s, load {result['load']:.1f})"), flush=True)
            (OUT / "results.json").write_text(json.dumps({"baselines_gb": baselines, "results": results}, indent=1))
    report(results, baselines)
    sys.exit(0 if all("error" not in r for r in results) else 1)


def report(results: list[dict], baselines: dict) -> None:
    """The table and the plan's error, predictions made now from the measurements' configurations."""
    for result in results:
        if "error" not in result:
            result.update(predict(result, baselines[result["backend"]]))
    markdown = table(results)
    (OUT / "results.md").write_text(markdown + "\n")
    print(", ".join(f"baseline resident set under {name}: {size:.3f} GB" for name, size in baselines.items()))
    print(markdown)
    ran = [r for r in results if "error" not in r]
    if ran:
        for label, errors in (("whole resident set", [r["predicted_gb"] / r["peak_gb"] - 1 for r in ran]),
                              ("above the baseline",
                               [r["plan_gb"] / (r["peak_gb"] - r["baseline_gb"]) - 1 for r in ran])):
            print(f"plan error, {label}: mean {100 * sum(errors) / len(errors):+.1f}%, mean absolute "
                  f"{100 * sum(map(abs, errors)) / len(errors):.1f}%, from {100 * min(errors):+.0f}% to "
                  f"{100 * max(errors):+.0f}%")


if __name__ == "__main__":
    main()
