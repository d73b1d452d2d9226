"""Rollouts: generated tokens/s with the KV cache and without it, with a group's prompt prefilled once and per answer,
and where a PPO step's time goes, phase by phase.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.rollout [--model small --max_new_tokens 64] [--from_weight DIR]
        [--group_size 8] [--compile]

Decoding: the first --prompts prompts of the demo RL data (config/data/posttrain/rl/demo.yaml, PPO's in
launch/run_pipeline.sh), left-padded into one batch and sampled as rollouts are (temperature 1, stopping at EOS)
in fp32 on the CPU. A seeded generator makes both paths draw the same tokens (tests/test_generate_nocache.py), so
they do the same work but for the cache. Then groups as GRPO samples them (--group_size answers a prompt): each prompt
prefilled once and its cache copied to its rows, against the prompts repeated row by row (the same tokens drawn,
tests/test_generate.py); with --compile, those groups with their decode steps under torch.compile against eager. Each
path decodes once to warm up (and compile), then --repeats times, the order alternating; the figures are medians.

PPO phases: a short run of launch/run_ppo.sh (the deepspeed launcher, one CPU rank, ZeRO-0, rule reward, the
same prompts per step and answer length, a line per step, the first step a throughput warm-up), then the mean
share of each timing/<phase>_s in system/step_time_s over its timed steps, and the phases' rates (perf/*:
generation's tokens/s and memory-bandwidth utilisation, each phase's MFU). Without --from_weight the policy is the preset
untrained: it rarely says EOS, so every answer runs to --max_new_tokens, the most rollout work a step can have.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.compare import free_port
from data.mixture import load_data_config
from data.prepare import load_prepared
from data.prompts import PromptLoader
from data.tokenizer import load_tokenizer
from model import ModelConfig, Transformer, generate, load_pretrained, save_pretrained
from train.config import REPO_ROOT

DATA_CONFIG = "config/data/posttrain/rl/demo.yaml"


def demo_prompts(count: int, tokenizer) -> list[list[int]]:
    prepared = load_prepared(load_data_config(REPO_ROOT / DATA_CONFIG), tokenizer)
    return next(PromptLoader(prepared.split("train"), count).iterate(0))["prompt_ids"]


class CompiledDecodeSteps(torch.nn.Module):
    """The model with its decode steps (new tokens against a filled cache) under torch.compile, dynamic shapes as the
    cache grows each step; the prefill, whose padding layout is read on the host, stays eager."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model, self.config = model, model.config
        self.compiled = torch.compile(model, dynamic=True)

    def forward(self, input_ids, kv_cache=None, **options):
        decoding = kv_cache is not None and kv_cache.length > 0
        return (self.compiled if decoding else self.model)(input_ids, kv_cache=kv_cache, **options)

    def logits_from_hidden(self, hidden):
        return self.model.logits_from_hidden(hidden)


def decode_rate(model, prompts, options: dict, args, tokenizer) -> tuple[float, int, float]:
    """(generated tokens per second, generated tokens, seconds) of one seeded decode."""
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    generation = generate(model, prompts, args.max_new_tokens, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id, generator=generator, **options)
    seconds = time.perf_counter() - started
    tokens = int(generation.mask.sum())
    return tokens / seconds, tokens, seconds


def compare_decoding(args, tokenizer, title: str, paths: dict[str, tuple]) -> None:
    """Two ways to decode the same answers, (model, prompts, generate options) by label: the first against the
    second."""
    rates = {label: [] for label in paths}
    warmups = {label: decode_rate(*paths[label], args, tokenizer) for label in paths}
    labels = list(paths)
    for repeat in range(args.repeats):
        for label in (labels if repeat % 2 == 0 else labels[::-1]):
            rates[label].append(decode_rate(*paths[label], args, tokenizer)[0])
    _, prompts, options = paths[labels[0]]
    widths = [len(p) for p in prompts]
    rows = len(prompts) * options.get("samples_per_prompt", 1)
    print(f"{title}: {rows} rows, prompts of {min(widths)}-{max(widths)} tokens, up to {args.max_new_tokens} new, "
          f"fp32, {torch.get_num_threads()} threads")
    for label in labels:
        print(f"  {label}: median {statistics.median(rates[label]):.1f} tokens/s "
              f"(runs: {' '.join(f'{rate:.1f}' for rate in rates[label])}); {warmups[label][1]} generated, "
              f"warm-up {warmups[label][2]:.1f} s")
    first, second = (statistics.median(rates[label]) for label in labels)
    print(f"  {labels[0]} / {labels[1]}: {first / second:.2f}x")


def ppo_phases(weights: Path, args, out_dir: Path) -> None:
    env = {**os.environ, "NUM_GPUS": "1", "ZERO_STAGE": "0", "MASTER_PORT": str(free_port())}
    command = ["bash", "launch/run_ppo.sh", "--from_weight", str(weights), "--out_dir", str(out_dir),
               "--reward", "rule", "--batch_size", str(args.prompts), "--max_new_tokens", str(args.max_new_tokens),
               "--max_steps", str(args.ppo_steps), "--log_interval", "1", "--throughput_warmup_steps", "1",
               "--eval_interval", "0", "--eval_batches", "0", "--save_interval", "0"]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode:
        raise SystemExit(f"{run.stdout[-6000:]}\nthe PPO run failed (exit {run.returncode}): {' '.join(command)}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["system/step_time_s"] is not None]
    step_time = statistics.mean(r["system/step_time_s"] for r in timed)
    print(f"PPO ({args.ppo_steps} steps of {args.prompts} prompts, the first untimed): step time {step_time:.2f} s, "
          f"answers {statistics.mean(r['rollout/response_length'] for r in timed):.1f} tokens, data wait "
          f"{statistics.mean(r['system/data_wait_percent'] for r in timed):.2g}%")
    phases = [key for key in timed[0] if key.startswith("timing/")]
    for key in phases:
        seconds = statistics.mean(r[key] for r in timed)
        print(f"  {key[len('timing/'):-2]:<9} {seconds:6.2f} s  {100 * seconds / step_time:5.1f}% of the step")
    for key in ("perf/generate_tokens_per_second", "perf/generate_mbu_percent", "perf/generate_mfu_percent",
                "perf/reference_mfu_percent", "perf/update_mfu_percent", "train/mfu_percent"):
        values = [r[key] for r in timed if r.get(key) is not None]
        print(f"  {key}: {statistics.mean(values):.3g}" if values else f"  {key}: null")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="preset of the untrained policy (without --from_weight)")
    parser.add_argument("--from_weight", default="", help="an export directory (an SFT policy) instead")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch (and per PPO step)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--group_size", type=int, default=8, help="answers per prompt in the group comparison (GRPO's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per path")
    parser.add_argument("--ppo_steps", type=int, default=4, help="PPO steps (0: skip the PPO run)")
    parser.add_argument("--compile", action="store_true",
                        help="also decode the groups with their decode steps under torch.compile (its warm-up "
                             "compiles)")
    args = parser.parse_args()
    if args.ppo_steps == 1:
        parser.error("--ppo_steps 1 times nothing: the first step is the warm-up")
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    model = load_pretrained(args.from_weight) if args.from_weight else Transformer(ModelConfig.from_preset(args.model))
    print(f"policy: {args.from_weight or f'{args.model} preset, untrained'}")
    model.eval()
    prompts = demo_prompts(args.prompts, tokenizer)
    compare_decoding(args, tokenizer, "decoding", {"KV cache": (model, prompts, {}),
                                                   "no cache": (model, prompts, {"use_cache": False})})
    repeated = [prompt for prompt in prompts for _ in range(args.group_size)]
    group = {"samples_per_prompt": args.group_size}
    compare_decoding(args, tokenizer, f"groups of {args.group_size} answers",
                     {"prompt prefilled once": (model, prompts, group), "prompt per answer": (model, repeated, {})})
    if args.compile:
        compare_decoding(args, tokenizer, f"groups of {args.group_size} answers, decode steps under torch.compile",
                         {"compiled": (CompiledDecodeSteps(model), prompts, group), "eager": (model, prompts, group)})
    if args.ppo_steps:
        with tempfile.TemporaryDirectory(prefix="bench_rollout_") as scratch:
            weights = Path(args.from_weight) if args.from_weight else save_pretrained(model, Path(scratch) / "policy")
            ppo_phases(weights, args, Path(scratch) / "ppo")


if __name__ == "__main__":
    main()
