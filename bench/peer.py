"""Peer benchmark: zerostage's SFT against Hugging Face transformers.Trainer, and its DPO against TRL's DPOTrainer,
on this machine's CPU, one after the other, never at once.

    make bench-peer   # = .venv/bin/python bench/peer.py [--steps 20 --warmup 3 --batch_size 4 --max_seq_len 256
                      #   --threads N --zero_stage 2 --zerostage_packing packed --out out/bench_peer.json]

Both sides train the same model (zerostage's `small` preset; the peer is a transformers LlamaForCausalLM with the same
dimensions, fp32, SDPA attention; the parameter counts are checked equal) on the same tokenized documents the demo
trains on (the prepared stores of config/data/posttrain/sft/general.yaml and config/data/posttrain/dpo/demo.yaml),
with the same micro-batch (--batch_size rows; for DPO, pairs on the peer's side and rows of packed pairs on
zerostage's when --zerostage_packing is packed), sequence length, optimizer settings and thread
count, from fresh weights. zerostage runs as a user runs it: launch/run_<stage>.sh, the deepspeed launcher with one
CPU rank, its figure the real (non-padding input) tokens/s of its metrics.jsonl over the steps after --warmup. The
peer runs in this process; a TrainerCallback times the same steps, and the real tokens of the batches it trained on
are counted from the documents themselves as the collator takes them.

SFT: HF Trainer's default, one document per row padded to the longest of the batch (DataCollatorForSeq2Seq), no
packing; zerostage packs documents into rows of --max_seq_len (what make demo does) unless --zerostage_packing
padded. DPO: chosen + rejected real tokens per second, the policy and a frozen reference forward every step on both
sides. Everything that could not be matched is printed under "differences" and written to --out (JSON).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import socket
import subprocess
import time

import numpy as np
import torch

from data.loader import IGNORE_INDEX
from data.mixture import load_data_config
from data.prepare import load_prepared
from data.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer
from model import ModelConfig, num_params
from train.config import REPO_ROOT

SFT_DATA = "config/data/posttrain/sft/general.yaml"
DPO_DATA = "config/data/posttrain/dpo/demo.yaml"
# The stage scripts' own learning rates (train/sft.py, train/dpo.py) and optimizer settings (train/config.py),
# given to both sides: they do not change the cost of a step, but the runs should be the same training.
SFT_LR, DPO_LR, BETA = 2e-4, 5e-5, 0.1
WEIGHT_DECAY, ADAM_BETAS, GRAD_CLIP, SEED = 0.1, (0.9, 0.95), 1.0, 42


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before the timed ones (>= 1)")
    parser.add_argument("--batch_size", type=int, default=4, help="micro-batch: SFT rows, DPO pairs")
    parser.add_argument("--max_seq_len", type=int, default=256, help="the data configs' max_seq_len by default")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of each side (OMP_NUM_THREADS of the zerostage rank)")
    parser.add_argument("--zero_stage", default="2", help="ZERO_STAGE of zerostage's launcher (its default: 2)")
    parser.add_argument("--zerostage_packing", choices=("packed", "padded"), default="packed",
                        help="zerostage's SFT and DPO rows: packed (make demo's SFT) or padded (the stages' default)")
    parser.add_argument("--out", default="out/bench_peer.json")
    parser.add_argument("--skip_dpo", action="store_true", help="the SFT comparison only")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the timer starts at the end of the last warm-up step)")
    return args


# ----------------------------------------------------------------- the same model

def llama_config(config: ModelConfig):
    """A transformers LlamaConfig of zerostage's dimensions: the same Llama recipe (pre-norm RMSNorm, RoPE, GQA,
    SwiGLU without biases, tied embeddings)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                       num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                       max_position_embeddings=config.max_seq_len, rms_norm_eps=config.rms_norm_eps,
                       tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                       attention_dropout=config.dropout, attn_implementation="sdpa", dtype="float32")


def peer_model(config: ModelConfig):
    from transformers import LlamaForCausalLM
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(llama_config(config)).float()
    peer, own = sum(p.numel() for p in model.parameters()), num_params(config)
    if peer != own:
        raise SystemExit(f"parameter counts differ: zerostage {own:,}, LlamaForCausalLM {peer:,}")
    return model


def hf_tokenizer(pad_id: int):
    """zerostage's tokenizer.json as the PreTrainedTokenizerFast the collators pad with (pad id as zerostage's)."""
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(DEFAULT_TOKENIZER_DIR / "tokenizer.json"))
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    return tokenizer


# ----------------------------------------------------------------- the same data

def prepared_split(data_config: str, max_seq_len: int):
    """The train split zerostage reads for this data config at this sequence length (prepared if missing)."""
    config = dataclasses.replace(load_data_config(REPO_ROOT / data_config), max_seq_len=max_seq_len)
    return load_prepared(config, load_tokenizer()).split("train")


def sft_examples(store, max_seq_len: int) -> list[dict]:
    """Each document as HF causal-LM features: labels are the tokens where zerostage's loss_mask is 1 (-100
    elsewhere); the model shifts them, so position t predicts token t+1 exactly where zerostage's label is."""
    examples = []
    for index in range(len(store)):
        tokens, mask = (array[:max_seq_len].astype(np.int64) for array in store.doc(index))
        examples.append({"input_ids": tokens.tolist(), "attention_mask": [1] * len(tokens),
                         "labels": np.where(mask == 1, tokens, IGNORE_INDEX).tolist()})
    return examples


def preference_examples(store) -> tuple[list[dict], int]:
    """Each pair as TRL's tokenized preference features: the prompt is the shared prefix before the first
    supervised token; chosen/rejected are the rest of each document. Also returns how many tokens of the
    completions zerostage does not supervise (the newline after <|im_end|>), which TRL does."""
    examples, unsupervised = [], 0
    for index in range(len(store)):
        (chosen, chosen_mask), (rejected, rejected_mask) = store.chosen.doc(index), store.rejected.doc(index)
        start = int(np.argmax(chosen_mask))
        if int(np.argmax(rejected_mask)) != start or not np.array_equal(chosen[:start], rejected[:start]):
            raise SystemExit(f"pair {index}: chosen and rejected do not share the prompt before the answer")
        unsupervised += int((chosen_mask[start:] == 0).sum() + (rejected_mask[start:] == 0).sum())
        examples.append({"prompt_ids": chosen[:start].tolist(), "chosen_ids": chosen[start:].tolist(),
                         "rejected_ids": rejected[start:].tolist()})
    return examples, unsupervised


class CountingCollator:
    """A collator that notes each batch's real tokens, counted from the features before padding. Batches are
    collated in training order (the dataloader may collate one ahead), so batch k is step k's."""

    def __init__(self, collate, real_tokens):
        self.collate, self.real_tokens, self.per_batch = collate, real_tokens, []

    def __call__(self, features: list[dict]):
        self.per_batch.append(sum(self.real_tokens(feature) for feature in features))
        return self.collate(features)


# ----------------------------------------------------------------- the peer side

def step_timer(warmup: int, steps: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time from the end of the last warm-up step to the end of the last timed one."""

        def __init__(self):
            self.start = self.end = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = time.perf_counter()
            elif state.global_step == warmup + steps:
                self.end = time.perf_counter()

    return StepTimer()


def peer_arguments(args, out_dir: str, learning_rate: float) -> dict:
    """TrainingArguments shared by both peers: fp32 on the CPU, no logging, saving or evaluation in the run."""
    return dict(output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
                learning_rate=learning_rate, weight_decay=WEIGHT_DECAY, adam_beta1=ADAM_BETAS[0],
                adam_beta2=ADAM_BETAS[1], max_grad_norm=GRAD_CLIP, lr_scheduler_type="cosine", seed=SEED,
                use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, logging_strategy="no",
                save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)


def timed_figures(timer, collator: CountingCollator, args) -> dict:
    tokens = sum(collator.per_batch[args.warmup:args.warmup + args.steps])
    seconds = timer.end - timer.start
    return {"tokens_per_second": tokens / seconds, "timed_tokens": tokens, "timed_seconds": seconds,
            "tokens_per_step": tokens / args.steps}


def run_hf_sft(args, config: ModelConfig, store, tokenizer) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
                                lambda feature: len(feature["input_ids"]))
    timer = step_timer(args.warmup, args.steps)
    trainer = Trainer(model=peer_model(config), args=TrainingArguments(**peer_arguments(
        args, str(REPO_ROOT / "out/bench_peer/hf_sft"), SFT_LR)), data_collator=collator,
        train_dataset=Dataset.from_list(sft_examples(store, args.max_seq_len)), callbacks=[timer])
    trainer.train()
    return timed_figures(timer, collator, args)


def run_trl_dpo(args, config: ModelConfig, examples: list[dict], tokenizer) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on pairs zerostage already tokenized: TRL would re-render the chats from text."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    def real_tokens(pair: dict) -> int:  # both rows of the pair, as TRL's collator truncates them
        prompt = len(pair["prompt_ids"])
        return sum(min(prompt + len(pair[side]), args.max_seq_len) for side in ("chosen_ids", "rejected_ids"))

    collator = CountingCollator(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id,
                                                          max_length=args.max_seq_len), real_tokens)
    timer = step_timer(args.warmup, args.steps)
    policy = peer_model(config)
    dpo_args = DPOConfig(**peer_arguments(args, str(REPO_ROOT / "out/bench_peer/trl_dpo"), DPO_LR),
                         beta=BETA, loss_type=["sigmoid"], max_length=args.max_seq_len,
                         activation_checkpointing=False, precompute_ref_log_probs=False)
    trainer = PretokenizedDPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=dpo_args,
                                     data_collator=collator, train_dataset=Dataset.from_list(examples),
                                     processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timed_figures(timer, collator, args)


# ----------------------------------------------------------------- the zerostage side

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_zerostage(stage: str, args, flags: list[str]) -> dict:
    """launch/run_<stage>.sh on one CPU rank; its rate over the steps after the warm-up, from metrics.jsonl."""
    out_dir = REPO_ROOT / "out/bench_peer" / f"zerostage_{stage}"
    total = args.warmup + args.steps
    command = ["bash", f"launch/run_{stage}.sh", "--model", "small", "--from_weight", "none", "--dtype", "fp32",
               "--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
               "--max_steps", str(total), "--log_interval", str(total), "--throughput_warmup_steps", str(args.warmup),
               "--eval_interval", "0", "--eval_batches", "1", "--save_interval", "0", "--seed", str(SEED),
               "--weight_decay", str(WEIGHT_DECAY), "--adam_beta1", str(ADAM_BETAS[0]),
               "--adam_beta2", str(ADAM_BETAS[1]), "--grad_clip", str(GRAD_CLIP), "--out_dir", str(out_dir), *flags]
    env = {**os.environ, "NUM_GPUS": "1", "OMP_NUM_THREADS": str(args.threads), "ZERO_STAGE": args.zero_stage,
           "MASTER_PORT": str(free_port())}
    log = out_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        status = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"zerostage {stage} exited {status}; {log} ends:\n{tail}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    record = next(r for r in reversed(records) if r.get("train/tokens_per_second") is not None)
    seconds = (record["train/global_step"] - args.warmup) / record["train/steps_per_second"]
    tokens_per_second = record["train/tokens_per_second"]
    return {"tokens_per_second": tokens_per_second, "timed_tokens": round(tokens_per_second * seconds),
            "timed_seconds": seconds, "tokens_per_step": tokens_per_second * seconds / args.steps,
            "command": " ".join([*(f"{name}={env[name]}" for name in ("NUM_GPUS", "OMP_NUM_THREADS", "ZERO_STAGE")),
                                 *command]), "log": str(log.relative_to(REPO_ROOT))}


# ----------------------------------------------------------------- the comparison

def compare(zerostage: dict, peer: dict, peer_name: str) -> dict:
    return {"zerostage": zerostage, peer_name: peer,
            "ratio_zerostage_over_peer": zerostage["tokens_per_second"] / peer["tokens_per_second"]}


def print_comparison(title: str, result: dict, peer_name: str) -> None:
    print(f"\n{title}")
    for name in ("zerostage", peer_name):
        figures = result[name]
        print(f"  {name:11s} {figures['tokens_per_second']:9.1f} real tokens/s  ({figures['timed_tokens']:,} tokens "
              f"in {figures['timed_seconds']:.1f}s, {figures['tokens_per_step']:.0f} per step)")
    print(f"  zerostage / {peer_name}: {result['ratio_zerostage_over_peer']:.2f}x")


def versions() -> dict:
    import transformers
    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl
        found["trl"] = trl.__version__
    except ImportError:
        found["trl"] = None
    return found


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_preset("small")
    tokenizer = load_tokenizer()
    sft_store = prepared_split(SFT_DATA, args.max_seq_len)
    peer_params = sum(p.numel() for p in peer_model(config).parameters())
    print(f"model: zerostage small {num_params(config):,} parameters, LlamaForCausalLM {peer_params:,}; fp32, "
          f"{args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps, micro-batch {args.batch_size}, "
          f"max_seq_len {args.max_seq_len}", flush=True)
    hf = hf_tokenizer(tokenizer.pad_id)
    differences = [
        f"SFT rows: zerostage {args.zerostage_packing} ("
        + ("documents packed end to end into rows of max_seq_len, attention kept within each document"
           if args.zerostage_packing == "packed" else "one document per row, the batch cut to its longest row")
        + "); HF Trainer one document per row padded to the longest of the batch (DataCollatorForSeq2Seq), no "
          "packing, its default. A micro-batch of the same row count therefore holds more real tokens on the "
          "zerostage side when packed.",
        "Engine: zerostage runs under DeepSpeed "
        f"ZeRO-{args.zero_stage} (launcher default) with one CPU rank; the peers under accelerate without DeepSpeed, "
        "with the Trainer's default optimizer (torch's fused AdamW); zerostage's is torch AdamW (foreach) stepped "
        "by DeepSpeed's ZeRO optimizer on its flat fp32 partition. TRL's default activation checkpointing and bf16 "
        "are turned off, so both sides run fp32 without recomputation.",
        "Data order: each side shuffles the same training documents with its own sampler, so the timed steps see "
        "different (equally distributed) documents; the figure is per real token, not per step.",
        "Model code: zerostage's own Transformer (SDPA with a document mask) vs transformers' LlamaForCausalLM (SDPA, "
        "causal with the padding mask); same dimensions, parameter count and dtype, initial weights drawn differently.",
        "zerostage's run also writes a final checkpoint, export and one evaluation batch; they fall after its timed "
        "window, as the peers' set-up and teardown fall outside theirs.",
    ]
    result = {"settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "dtype": "fp32",
                           "sft_data": SFT_DATA, "dpo_data": DPO_DATA, "cpu_count": os.cpu_count()},
              "versions": versions(), "parameters": {"zerostage": num_params(config), "peer": peer_params}}

    print(f"\n[1/4] zerostage SFT ({args.zerostage_packing})", flush=True)
    zerostage_sft = run_zerostage("sft", args, ["--packing", args.zerostage_packing, "--learning_rate", str(SFT_LR)])
    print("[2/4] Hugging Face Trainer SFT", flush=True)
    result["sft"] = compare(zerostage_sft, run_hf_sft(args, config, sft_store, hf), "hf_trainer")
    print_comparison("SFT", result["sft"], "hf_trainer")

    if not args.skip_dpo:
        result["dpo"] = dpo_comparison(args, config, hf, differences)
    result["differences"] = differences
    print("\ndifferences:")
    for line in differences:
        print(f"  - {line}")
    out = REPO_ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


def dpo_comparison(args, config: ModelConfig, tokenizer, differences: list[str]) -> dict:
    """zerostage DPO against TRL's DPOTrainer; the reason when TRL cannot run here."""
    examples, unsupervised = preference_examples(prepared_split(DPO_DATA, args.max_seq_len))
    try:
        import trl  # noqa: F401
    except ImportError as error:
        reason = f"TRL is not installed ({error}); make bench-peer installs requirements-bench.txt"
        print(f"\nDPO skipped: {reason}")
        return {"error": reason}
    print(f"\n[3/4] zerostage DPO", flush=True)
    # The same packing choice as SFT's: packed, --batch_size counts rows of whole pairs, as SFT's counts rows.
    zerostage_dpo = run_zerostage("dpo", args, ["--beta", str(BETA), "--dpo_loss", "sigmoid",
                                                "--learning_rate", str(DPO_LR), "--packing", args.zerostage_packing])
    print("[4/4] TRL DPOTrainer", flush=True)
    try:
        trl_dpo = run_trl_dpo(args, config, examples, tokenizer)
    except Exception as error:  # the SFT comparison stands without it; the reason goes into the output
        reason = f"TRL DPOTrainer failed on this CPU: {type(error).__name__}: {error}"
        print(f"\nDPO: {reason}")
        return {"zerostage": zerostage_dpo, "error": reason}
    result = compare(zerostage_dpo, trl_dpo, "trl")
    print_comparison("DPO (chosen + rejected real tokens)", result, "trl")
    rows = 2 * len(examples)
    differences += [
        f"DPO rows: zerostage {args.zerostage_packing} ("
        + ("whole pairs packed into --batch_size rows of max_seq_len, a micro-batch holding more pairs than the "
           "peer's" if args.zerostage_packing == "packed" else "--batch_size pairs, cut to the longest row")
        + "); TRL --batch_size pairs padded to the longest row, its default.",
        f"DPO supervision: TRL scores every completion token after the shared prompt, including the newline after "
        f"<|im_end|> that zerostage's loss mask leaves out ({unsupervised:,} more targets over {rows:,} rows); "
        "the input tokens are the same.",
        "DPO logits: both project only the supervised positions through the LM head (TRL's fused LM head, "
        "zerostage's logits_from_hidden); TRL's head also computes entropy, mean logit and top-1 accuracy for its "
        "logged metrics, which zerostage does not.",
        "DPO data: the pairs reach TRL already tokenized by zerostage (its _prepare_dataset, which re-renders chats "
        "from text, is bypassed); TRL's own collator (DataCollatorForPreference) builds the batches.",
    ]
    return result


if __name__ == "__main__":
    main()
