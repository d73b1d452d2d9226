"""Peer benchmark: zerostage's SFT against TRL's SFTTrainer (packed), its GRPO against TRL's GRPOTrainer and its DPO
against TRL's DPOTrainer, on this machine's CPU, one after the other, never at once.

    make bench-peer   # = .venv/bin/python bench/peer.py [--only sft,grpo,dpo --steps 20 --warmup 3 --batch_size 4
                      #   --max_seq_len 512 --grpo_steps 8 --grpo_warmup 2 --prompts_per_step 8 --group_size 8
                      #   --max_new_tokens 32 --threads N --zero_stage auto --out out/bench_peer.json]

Every part trains the same model (zerostage's `small` preset; the peer is a transformers LlamaForCausalLM with the same
dimensions, fp32; the parameter counts are checked equal) from fresh weights, on the same tokenized data, with the same
optimizer settings and thread count. zerostage runs as a user runs it: launch/run_<stage>.sh, the deepspeed launcher
with one CPU rank, its figures from its metrics.jsonl over the steps after the warm-up. TRL runs in this process; a
TrainerCallback times the same steps, and what the batches held is counted from the data as the collator (or the
reward function) takes it.

SFT (--steps, --warmup): rows of --max_seq_len (512) tokens, --batch_size rows a micro-batch, loss on the assistant
tokens only, on the prepared store of config/data/posttrain/sft/general.yaml. zerostage packs documents end to end into
the rows (--packing packed). TRL: SFTTrainer with packing=True, packing_strategy="bfd" (best-fit decreasing, which makes
it padding-free: the batch's rows flattened into one sequence with position_ids restarting per document), max_length =
the row length, gradient checkpointing and bf16 off, zerostage's loss mask given as the `assistant_masks` column; the
attention implementation is --trl_attention (SDPA: transformers derives a block-diagonal mask from the packed
position_ids, so documents stay isolated). Reported: real (non-padding) tokens/s, the ratio, and MFU of both sides by
zerostage's own formula (model/flops.py: 3 × forward FLOPs of the real documents, attention per document) over the CPU
peak zerostage's run measured (train/peak_flops.py, recorded in its run_config.json); zerostage's MFU is shown both
as its metrics.jsonl logged it and recomputed here from its batches (rebuilt with its own loader).

GRPO (--grpo_steps, --grpo_warmup): the demo RL prompts (config/data/posttrain/rl/demo.yaml), --prompts_per_step
prompts an optimizer step, --group_size answers each of at most --max_new_tokens tokens sampled at temperature 1 (both
stop at EOS; the tokens actually generated are counted), zerostage's rule reward (train/rollout.py: rule_reward) on
both sides, zerostage's KL weight and clip range, one optimizer step per rollout batch (zerostage --ppo_epochs 1; TRL
num_iterations=1, steps_per_generation=1), the same --prompts_per_step × --group_size answer rows in one micro-batch.
Reported: seconds per prompt (rollout + update: the wall time of a step over its prompts), the ratio, and generated
tokens/s (of the step, and of the generation alone).

DPO (--steps, --warmup, --dpo_max_seq_len): chosen + rejected real tokens per second of zerostage's DPO and TRL's
DPOTrainer on config/data/posttrain/dpo/demo.yaml, the policy and a frozen reference forward every step on both sides;
zerostage's rows --zerostage_packing.

Everything that could not be matched is printed under "differences" and written to --out (JSON); a figure that cannot
be known is null, with the reason.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
import time

import numpy as np
import torch

from data.loader import IGNORE_INDEX, BatchLoader
from data.mixture import load_data_config
from data.prepare import load_prepared
from data.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer
from model import ModelConfig, forward_flops, num_params
from train.config import REPO_ROOT

SFT_DATA = "config/data/posttrain/sft/general.yaml"
DPO_DATA = "config/data/posttrain/dpo/demo.yaml"
RL_DATA = "config/data/posttrain/rl/demo.yaml"
PARTS = ("sft", "grpo", "dpo")
# The stage scripts' own learning rates (train/sft.py, train/dpo.py, train/grpo.py) and optimizer settings
# (train/config.py), given to both sides: they do not change the cost of a step, but the runs should be the same
# training.
SFT_LR, DPO_LR, GRPO_LR, BETA = 2e-4, 5e-5, 1e-5, 0.1
WEIGHT_DECAY, ADAM_BETAS, GRAD_CLIP, SEED = 0.1, (0.9, 0.95), 1.0, 42


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    for part in PARTS:
        parser.add_argument(f"--skip_{part}", action="store_true", help=f"leave the {part.upper()} comparison out")
    parser.add_argument("--steps", type=int, default=20, help="SFT and DPO: timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3,
                        help="SFT and DPO: optimizer steps before the timed ones (>= 1)")
    parser.add_argument("--batch_size", type=int, default=4, help="micro-batch: SFT rows, DPO pairs")
    parser.add_argument("--max_seq_len", type=int, default=512, help="SFT row length (zerostage's rows, TRL's "
                                                                     "max_length)")
    parser.add_argument("--dpo_max_seq_len", type=int, default=None,
                        help=f"DPO sequence length (default: {DPO_DATA}'s max_seq_len)")
    parser.add_argument("--grpo_steps", type=int, default=8, help="GRPO: timed optimizer steps per side")
    parser.add_argument("--grpo_warmup", type=int, default=2, help="GRPO: optimizer steps before the timed ones (>= 1)")
    parser.add_argument("--prompts_per_step", type=int, default=8, help="GRPO: prompts per optimizer step")
    parser.add_argument("--group_size", type=int, default=8, help="GRPO: answers sampled per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="GRPO: longest answer")
    parser.add_argument("--trl_attention", default="sdpa",
                        help="attention implementation of the TRL side (transformers' attn_implementation; it must "
                             "keep the documents of a padding-free packed row apart, as sdpa does)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of each side (OMP_NUM_THREADS of the zerostage rank)")
    parser.add_argument("--zero_stage", default="auto",
                        help="ZERO_STAGE of zerostage's launcher; auto: unset, the launcher's default (ZeRO-0 on one rank)")
    parser.add_argument("--zerostage_packing", choices=("packed", "padded"), default="packed",
                        help="zerostage's DPO rows: packed or padded (SFT is packed on both sides)")
    parser.add_argument("--out", default="out/bench_peer.json")
    args = parser.parse_args()
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)} (valid: {', '.join(PARTS)})")
    args.parts = [part for part in PARTS if part in parts and not getattr(args, f"skip_{part}")]
    if not args.parts:
        parser.error("nothing to run: --only and --skip_* leave no part")
    if min(args.warmup, args.steps, args.grpo_warmup, args.grpo_steps) < 1:
        parser.error("--warmup, --steps, --grpo_warmup and --grpo_steps must be >= 1 (the timer starts at the end "
                     "of the last warm-up step)")
    if args.group_size < 2:
        parser.error("--group_size: a group needs at least 2 answers")
    if args.dpo_max_seq_len is None:
        args.dpo_max_seq_len = load_data_config(REPO_ROOT / DPO_DATA).max_seq_len
    return args


# ----------------------------------------------------------------- the same model

def llama_config(config: ModelConfig, attention: str = "sdpa"):
    """A transformers LlamaConfig of zerostage's dimensions: the same Llama recipe (pre-norm RMSNorm, RoPE, GQA,
    SwiGLU without biases, tied embeddings)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                       num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                       max_position_embeddings=config.max_seq_len, rms_norm_eps=config.rms_norm_eps,
                       tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_std,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                       attention_dropout=config.dropout, attn_implementation=attention, dtype="float32")


def peer_model(config: ModelConfig, attention: str = "sdpa"):
    from transformers import LlamaForCausalLM
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(llama_config(config, attention)).float()
    peer, own = sum(p.numel() for p in model.parameters()), num_params(config)
    if peer != own:
        raise SystemExit(f"parameter counts differ: zerostage {own:,}, LlamaForCausalLM {peer:,}")
    return model


def hf_tokenizer(pad_id: int, eos_id: int):
    """zerostage's tokenizer.json as the PreTrainedTokenizerFast TRL pads and stops generation with (pad and EOS ids
    as zerostage's)."""
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(DEFAULT_TOKENIZER_DIR / "tokenizer.json"))
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    return tokenizer


# ----------------------------------------------------------------- the same data

def prepared_data(data_config: str, max_seq_len: int | None = None):
    """What zerostage prepares for this data config at this sequence length (prepared if missing)."""
    config = load_data_config(REPO_ROOT / data_config)
    if max_seq_len is not None:
        config = dataclasses.replace(config, max_seq_len=max_seq_len)
    return load_prepared(config, load_tokenizer())


def prepared_split(data_config: str, max_seq_len: int | None = None):
    """The train split zerostage reads for this data config at this sequence length."""
    return prepared_data(data_config, max_seq_len).split("train")


def sft_examples(store, max_seq_len: int) -> list[dict]:
    """Each document as pretokenized SFTTrainer input: its tokens and zerostage's loss mask as `assistant_masks`, from
    which TRL builds the labels (a token is a target where the mask is 1, -100 elsewhere): exactly the targets of
    zerostage's pre-shifted labels."""
    examples = []
    for index in range(len(store)):
        tokens, mask = (array[:max_seq_len].astype(np.int64) for array in store.doc(index))
        examples.append({"input_ids": tokens.tolist(), "assistant_masks": mask.tolist()})
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
    """A collator that notes each batch's real tokens (and, given `documents`, the lengths of the documents it holds),
    counted from the features before padding. Batches are collated in training order (the dataloader may collate one
    ahead), so batch k is step k's."""

    def __init__(self, collate, real_tokens, documents=None):
        self.collate, self.real_tokens, self.documents = collate, real_tokens, documents
        self.per_batch, self.documents_per_batch = [], []

    def __call__(self, features: list[dict]):
        self.per_batch.append(sum(self.real_tokens(feature) for feature in features))
        if self.documents is not None:
            self.documents_per_batch.append([length for feature in features for length in self.documents(feature)])
        return self.collate(features)


def training_flops(config: ModelConfig, documents: list[list[int]]) -> float:
    """zerostage's model FLOPs of these micro-batches (train/stage.py, LanguageModelStage.batch_stats): 3 × the
    forward of the real documents, the LM head at every token, causal attention within each document."""
    return float(sum(3 * forward_flops(config, lengths) for lengths in documents))


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


def peer_arguments(args, out_dir: str, learning_rate: float, batch_size: int, total_steps: int) -> dict:
    """TrainingArguments shared by the peers: fp32 on the CPU without activation checkpointing (TRL's configs turn
    it and bf16 on by default), no logging, saving or evaluation in the run."""
    return dict(output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=total_steps,
                learning_rate=learning_rate, weight_decay=WEIGHT_DECAY, adam_beta1=ADAM_BETAS[0],
                adam_beta2=ADAM_BETAS[1], max_grad_norm=GRAD_CLIP, lr_scheduler_type="cosine", seed=SEED,
                use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
                logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)


def timed_figures(timer, collator: CountingCollator, warmup: int, steps: int) -> dict:
    tokens = sum(collator.per_batch[warmup:warmup + steps])
    seconds = timer.end - timer.start
    return {"tokens_per_second": tokens / seconds, "timed_tokens": tokens, "timed_seconds": seconds,
            "tokens_per_step": tokens / steps}


def packed_isolation_error(config: ModelConfig, attention: str, store, documents: int = 6) -> float:
    """Largest |logit difference| between documents forwarded packed in one padding-free row (position_ids
    restarting per document, no attention mask: what TRL's collator feeds the model) and each forwarded alone; ~1e-6
    when the attention implementation keeps the documents apart, O(1) when they see each other."""
    model = peer_model(config, attention).eval()
    docs = [torch.as_tensor(store.doc(index)[0].astype(np.int64)) for index in range(documents)]
    with torch.no_grad():
        positions = torch.cat([torch.arange(len(doc)) for doc in docs])[None]
        packed = model(input_ids=torch.cat(docs)[None], position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
    return float((packed - alone).abs().max())


def run_trl_sft(args, config: ModelConfig, store, tokenizer, peak: float | None) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    timer = step_timer(args.warmup, args.steps)
    sft_args = SFTConfig(**peer_arguments(args, str(REPO_ROOT / "out/bench_peer/trl_sft"), SFT_LR, args.batch_size,
                                          args.warmup + args.steps),
                         max_length=args.max_seq_len, packing=True, packing_strategy="bfd", padding_free=True,
                         completion_only_loss=False, assistant_only_loss=False, loss_type="nll",
                         activation_offloading=False, shuffle_dataset=False)
    examples = sft_examples(store, args.max_seq_len)
    trainer = SFTTrainer(model=peer_model(config, args.trl_attention), args=sft_args,
                         train_dataset=Dataset.from_list(examples), processing_class=tokenizer, callbacks=[timer])
    if not trainer.padding_free:
        raise RuntimeError("TRL's SFTTrainer did not turn padding-free on for bfd packing")
    # TRL refuses a custom collator with padding-free, so its own is wrapped once built.
    collator = CountingCollator(trainer.data_collator, lambda example: len(example["input_ids"]),
                                lambda example: example["seq_lengths"])
    trainer.data_collator = collator
    packed = trainer.train_dataset
    packed_tokens = sum(len(ids) for ids in packed["input_ids"])
    packed_targets = sum(sum(label != IGNORE_INDEX for label in labels) for labels in packed["labels"])
    data = {"documents": len(examples), "tokens": sum(len(e["input_ids"]) for e in examples),
            "truncated_documents": int((store.doc_lengths > args.max_seq_len).sum()),
            "targets": sum(sum(e["assistant_masks"]) for e in examples), "packed_rows": len(packed),
            "packed_documents": sum(len(lengths) for lengths in packed["seq_lengths"]), "packed_tokens": packed_tokens,
            "packed_targets": packed_targets}
    print(f"  TRL packed {data['packed_documents']:,} of {data['documents']:,} documents into {data['packed_rows']:,} "
          f"rows of <= {args.max_seq_len}: {packed_tokens:,} tokens (the store holds {data['tokens']:,}), "
          f"{packed_targets:,} targets (zerostage's loss mask: {data['targets']:,})", flush=True)
    trainer.train()
    figures = timed_figures(timer, collator, args.warmup, args.steps)
    timed_documents = collator.documents_per_batch[args.warmup:args.warmup + args.steps]
    if sum(map(sum, timed_documents)) != figures["timed_tokens"]:
        raise RuntimeError("TRL SFT: the documents' lengths do not add up to the tokens counted")
    flops = training_flops(config, timed_documents)
    figures.update(data=data, model_flops=flops, documents_timed=sum(map(len, timed_documents)),
                   mfu_percent=100 * flops / figures["timed_seconds"] / peak if peak else None,
                   attention=args.trl_attention)
    return figures


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
        return sum(min(prompt + len(pair[side]), args.dpo_max_seq_len) for side in ("chosen_ids", "rejected_ids"))

    collator = CountingCollator(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id,
                                                          max_length=args.dpo_max_seq_len), real_tokens)
    timer = step_timer(args.warmup, args.steps)
    policy = peer_model(config)
    dpo_args = DPOConfig(**peer_arguments(args, str(REPO_ROOT / "out/bench_peer/trl_dpo"), DPO_LR, args.batch_size,
                                          args.warmup + args.steps),
                         beta=BETA, loss_type=["sigmoid"], max_length=args.dpo_max_seq_len,
                         activation_checkpointing=False, precompute_ref_log_probs=False)
    trainer = PretokenizedDPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=dpo_args,
                                     data_collator=collator, train_dataset=Dataset.from_list(examples),
                                     processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timed_figures(timer, collator, args.warmup, args.steps)


def grpo_defaults() -> dict:
    """zerostage's GRPO defaults (train/grpo.py, train/rl.py), read from its config class."""
    from train.grpo import GRPOConfig
    return {field.name: field.default for field in dataclasses.fields(GRPOConfig)}


def run_trl_grpo(args, config: ModelConfig, store, tokenizer, zs_tokenizer) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from train.rollout import rule_reward
    defaults = grpo_defaults()

    # The prompts as zerostage tokenized them (ending in its generation prompt), keyed by their text with the
    # special tokens: TRL takes a text column, and the subclass below hands it back zerostage's ids.
    ids_by_text = {}
    rows = []
    for index in range(len(store)):
        ids = store.doc(index)[0].astype(int).tolist()
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if ids_by_text.setdefault(text, ids) != ids:
            raise RuntimeError(f"two prompts decode to the same text: {text!r}")
        rows.append({"prompt": text, "answer": store.answers[index]})
    generated, generation_seconds = [], []

    class PretokenizedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer on zerostage's prompt ids, timing the generation of each rollout batch."""

        def _tokenize_prompts(self, prompts: list):
            return [ids_by_text[prompt] for prompt in prompts], None, {}

        def _generate_single_turn(self, *positional, **named):
            started = time.perf_counter()
            output = super()._generate_single_turn(*positional, **named)
            generation_seconds.append(time.perf_counter() - started)
            return output

    def zerostage_rule_reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
        """zerostage's --reward rule on each answer as zerostage decodes it (train/rollout.py: RolloutMaker.score);
        also notes the tokens generated, EOS included, as zerostage's response lengths count them."""
        generated.append(sum(len(ids) for ids in completion_ids))
        return [rule_reward(zs_tokenizer.decode(list(ids)), reference)
                for ids, reference in zip(completion_ids, answer)]

    total = args.grpo_warmup + args.grpo_steps
    timer = step_timer(args.grpo_warmup, args.grpo_steps)
    rows_per_step = args.prompts_per_step * args.group_size
    grpo_args = GRPOConfig(**peer_arguments(args, str(REPO_ROOT / "out/bench_peer/trl_grpo"), GRPO_LR, rows_per_step,
                                            total),
                           num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                           temperature=defaults["temperature"], top_p=1.0, top_k=defaults["top_k"], min_p=None,
                           repetition_penalty=1.0, steps_per_generation=1, num_iterations=1,
                           gradient_accumulation_steps=1, beta=defaults["kl_coef"], epsilon=defaults["clip_range"],
                           loss_type="dapo", scale_rewards="group", use_bias_correction_kl=False,
                           mask_truncated_completions=False, use_vllm=False, log_completions=False,
                           remove_unused_columns=False, disable_dropout=True)
    # The reference is loaded from the policy's path (TRL builds it with from_pretrained): the fresh policy is saved
    # first, so the reference starts from the same weights, as zerostage's frozen copy does.
    policy = peer_model(config)
    initial = REPO_ROOT / "out/bench_peer/trl_grpo_initial"
    policy.save_pretrained(initial)
    policy.config._name_or_path = str(initial)
    trainer = PretokenizedGRPOTrainer(model=policy, reward_funcs=zerostage_rule_reward, args=grpo_args,
                                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                      callbacks=[timer])
    if trainer.ref_model is None:
        raise RuntimeError("TRL's GRPOTrainer built no reference model although beta > 0")
    trainer.train()
    if len(generated) < total:
        raise RuntimeError(f"TRL GRPO: {len(generated)} rollout batches scored for {total} steps")
    timed = slice(args.grpo_warmup, total)
    return grpo_figures(timer.end - timer.start, sum(generated[timed]), sum(generation_seconds[timed]), args,
                        per_step_generated=generated[timed])


def grpo_figures(seconds: float, tokens: int, generation_seconds: float | None, args, **extra) -> dict:
    prompts = args.grpo_steps * args.prompts_per_step
    rows = prompts * args.group_size
    return {"seconds_per_prompt": seconds / prompts, "seconds_per_step": seconds / args.grpo_steps,
            "timed_seconds": seconds, "timed_prompts": prompts, "generated_tokens": tokens,
            "generated_tokens_per_answer": tokens / rows,
            "generated_tokens_per_second": tokens / seconds,
            "generation_seconds": generation_seconds,
            "generation_tokens_per_second": tokens / generation_seconds if generation_seconds else None, **extra}


# ----------------------------------------------------------------- the zerostage side

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_zerostage(stage: str, args, flags: list[str], *, batch_size: int, warmup: int, steps: int,
                  max_seq_len: int | None, log_interval: int | None = None) -> tuple[dict, list[dict], dict]:
    """launch/run_<stage>.sh on one CPU rank: (how it ran, its metrics.jsonl records, its run_config.json)."""
    out_dir = REPO_ROOT / "out/bench_peer" / f"zerostage_{stage}"
    total = warmup + steps
    command = ["bash", f"launch/run_{stage}.sh", "--model", "small", "--from_weight", "none", "--dtype", "fp32",
               "--batch_size", str(batch_size), *(["--max_seq_len", str(max_seq_len)] if max_seq_len else []),
               "--max_steps", str(total), "--log_interval", str(log_interval or total),
               "--throughput_warmup_steps", str(warmup),
               "--eval_interval", "0", "--eval_batches", "1", "--save_interval", "0", "--seed", str(SEED),
               "--weight_decay", str(WEIGHT_DECAY), "--adam_beta1", str(ADAM_BETAS[0]),
               "--adam_beta2", str(ADAM_BETAS[1]), "--grad_clip", str(GRAD_CLIP), "--out_dir", str(out_dir), *flags]
    env = {**os.environ, "NUM_GPUS": "1", "OMP_NUM_THREADS": str(args.threads), "MASTER_PORT": str(free_port())}
    env.pop("ZERO_STAGE", None)
    if args.zero_stage != "auto":
        env["ZERO_STAGE"] = args.zero_stage
    # The bench's own scratch run from a previous invocation: zerostage refuses a fresh run over an earlier one.
    shutil.rmtree(out_dir, ignore_errors=True)
    log = out_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        status = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"zerostage {stage} exited {status}; {log} ends:\n{tail}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    run_config = json.loads((out_dir / "run_config.json").read_text())
    launch = {"command": " ".join([*(f"{name}={env[name]}" for name in ("NUM_GPUS", "OMP_NUM_THREADS", "ZERO_STAGE")
                                     if name in env),
                                   *command]), "log": str(log.relative_to(REPO_ROOT))}
    return launch, records, run_config


def token_rate(records: list[dict], warmup: int, steps: int) -> dict:
    """The real tokens/s of the rate window (the steps after the warm-up) from the run's last record."""
    record = next(r for r in reversed(records) if r.get("train/tokens_per_second") is not None)
    seconds = (record["train/global_step"] - warmup) / record["train/steps_per_second"]
    tokens_per_second = record["train/tokens_per_second"]
    return {"tokens_per_second": tokens_per_second, "timed_tokens": round(tokens_per_second * seconds),
            "timed_seconds": seconds, "tokens_per_step": tokens_per_second * seconds / steps, "record": record}


def zerostage_sft_documents(args, config: ModelConfig) -> list[list[int]]:
    """The document lengths of zerostage's timed SFT micro-batches, rebuilt with its own loader (data/loader.py) as
    train/data_loading.py builds it for one rank (packed, the run's seed and sampling weights) and measured as its
    metrics measure them (train/stage.py: drop_padding_columns, document_lengths)."""
    from train.stage import document_lengths, drop_padding_columns
    prepared = prepared_data(SFT_DATA, args.max_seq_len)
    loader = BatchLoader(prepared.split("train"), args.batch_size, args.max_seq_len, 0, 1, SEED, "packed",
                         weights=prepared.weights)
    total, batches, epoch = args.warmup + args.steps, [], 0
    while len(batches) < total:
        for batch in loader.iterate(epoch):
            batches.append(document_lengths(drop_padding_columns(batch)["doc_ids"]).tolist())
            if len(batches) == total:
                break
        epoch += 1
    return batches[args.warmup:total]


def run_zerostage_sft(args, config: ModelConfig) -> tuple[dict, float | None, str]:
    launch, records, run_config = run_zerostage(
        "sft", args, ["--packing", "packed", "--learning_rate", str(SFT_LR)], batch_size=args.batch_size,
        warmup=args.warmup, steps=args.steps, max_seq_len=args.max_seq_len)
    figures = token_rate(records, args.warmup, args.steps)
    record = figures.pop("record")
    peak = run_config["peak_flops"]["flops_per_second"]
    documents = zerostage_sft_documents(args, config)
    tokens = sum(map(sum, documents))
    flops = training_flops(config, documents)
    figures.update(launch)
    figures.update(model_flops=flops, documents_timed=sum(map(len, documents)), recomputed_tokens=tokens,
                   mfu_percent=100 * flops / figures["timed_seconds"] / peak if peak else None,
                   logged_mfu_percent=record.get("train/mfu_percent"),
                   logged_tflops_per_device=record.get("train/tflops_per_device"))
    if tokens != figures["timed_tokens"]:
        print(f"  WARNING: the rebuilt batches hold {tokens:,} tokens, zerostage's metrics "
              f"{figures['timed_tokens']:,}: the recomputed MFU is not of the batches it trained on", flush=True)
    return figures, peak, run_config["peak_flops"]["basis"]


def run_zerostage_grpo(args) -> dict:
    defaults = grpo_defaults()
    flags = ["--group_size", str(args.group_size), "--max_new_tokens", str(args.max_new_tokens),
             "--temperature", str(defaults["temperature"]), "--top_k", str(defaults["top_k"]), "--reward", "rule",
             "--ppo_epochs", "1", "--kl_coef", str(defaults["kl_coef"]), "--clip_range", str(defaults["clip_range"]),
             "--learning_rate", str(GRPO_LR)]
    launch, records, _ = run_zerostage("grpo", args, flags, batch_size=args.prompts_per_step,
                                       warmup=args.grpo_warmup, steps=args.grpo_steps, max_seq_len=None,
                                       log_interval=1)
    timed = [r for r in records if "train/global_step" in r and r["train/global_step"] > args.grpo_warmup
             and r.get("system/step_time_s") is not None]
    if len(timed) != args.grpo_steps:
        raise RuntimeError(f"zerostage GRPO: {len(timed)} timed step records, expected {args.grpo_steps}")
    rows = args.prompts_per_step * args.group_size
    per_step = [round(r["rollout/response_length"] * rows) for r in timed]
    return grpo_figures(sum(r["system/step_time_s"] for r in timed), sum(per_step),
                        sum(r["timing/generate_s"] for r in timed), args, per_step_generated=per_step, **launch)


# ----------------------------------------------------------------- the comparison

def print_rates(title: str, result: dict, peer_name: str) -> None:
    print(f"\n{title}")
    for name in ("zerostage", peer_name):
        figures = result[name]
        mfu = figures.get("mfu_percent")
        print(f"  {name:11s} {figures['tokens_per_second']:9.1f} real tokens/s  ({figures['timed_tokens']:,} tokens "
              f"in {figures['timed_seconds']:.1f}s, {figures['tokens_per_step']:.0f} per step)"
              + (f", MFU {mfu:.2f}%" if mfu is not None else ", MFU null" if "mfu_percent" in figures else ""))
    print(f"  zerostage / {peer_name}: {result['ratio_zerostage_over_peer']:.2f}x")


def sft_comparison(args, config: ModelConfig, tokenizer, differences: list[str]) -> dict:
    store = prepared_split(SFT_DATA, args.max_seq_len)
    print(f"\n[sft 1/2] zerostage SFT (packed rows of {args.max_seq_len})", flush=True)
    zerostage, peak, basis = run_zerostage_sft(args, config)
    logged = zerostage["logged_mfu_percent"]
    print(f"  zerostage MFU: its metrics.jsonl {logged if logged is None else f'{logged:.3f}'}%, recomputed here "
          f"{zerostage['mfu_percent'] if zerostage['mfu_percent'] is None else format(zerostage['mfu_percent'], '.3f')}"
          f"% ({zerostage['recomputed_tokens']:,} tokens in {zerostage['documents_timed']:,} document segments of the "
          f"rebuilt batches; its metrics counted {zerostage['timed_tokens']:,}); peak "
          + (f"{peak / 1e9:.1f} GFLOP/s" if peak else "unknown"), flush=True)
    print(f"[sft 2/2] TRL SFTTrainer (packing bfd, padding-free, {args.trl_attention})", flush=True)
    isolation = packed_isolation_error(config, args.trl_attention, store)
    isolated = isolation < 1e-3
    print(f"  {args.trl_attention}: a packed row's logits differ from its documents' own by at most {isolation:.2e}: "
          f"documents {'isolated' if isolated else 'NOT isolated (they attend to each other)'}", flush=True)
    try:
        trl = run_trl_sft(args, config, store, tokenizer, peak)
    except ImportError as error:
        reason = f"TRL is not installed ({error}); make bench-peer installs requirements-bench.txt"
        print(f"\nSFT: {reason}")
        return {"zerostage": zerostage, "trl": None, "error": reason, "peak_flops": peak, "peak_basis": basis}
    trl.update(packed_isolation_max_logit_error=isolation, documents_isolated=isolated)
    result = {"zerostage": zerostage, "trl": trl,
              "ratio_zerostage_over_peer": zerostage["tokens_per_second"] / trl["tokens_per_second"],
              "peak_flops": peak, "peak_basis": basis,
              "mfu_note": "model FLOPs of the real tokens by model/flops.py (3 x forward, attention per document) over "
                          "the CPU peak zerostage's run measured (train/peak_flops.py), the same for both sides"}
    print_rates(f"SFT (packed rows of {args.max_seq_len}, real tokens)", result, "trl")
    if logged is not None and zerostage["mfu_percent"] is not None:
        print(f"  zerostage MFU logged {logged:.3f}% vs recomputed {zerostage['mfu_percent']:.3f}% "
              f"(relative difference {abs(logged / zerostage['mfu_percent'] - 1):.2%})")
    elif logged is None:
        print("  zerostage's metrics logged no MFU (peak unknown, or MFU above 100% of it)")
    data = trl["data"]
    differences += [
        f"SFT rows: zerostage lays the shuffled documents end to end and cuts every {args.max_seq_len} tokens (a "
        "document cut at a row end continues in the next row; no padding but the epoch's last row), each row its "
        "own attention over its document segments. TRL bfd packs whole documents into bins of at most "
        f"{args.max_seq_len} tokens (longer ones truncated: {data['truncated_documents']:,} here), then its "
        "padding-free collator flattens "
        f"the {args.batch_size} bins of a micro-batch into ONE sequence (1 x up to "
        f"{args.batch_size * args.max_seq_len} tokens) with position_ids restarting per document.",
        f"SFT attention: TRL's side runs attn_implementation={args.trl_attention!r}. transformers (masking_utils: "
        "find_packed_sequence_indices) turns the restarting position_ids into a block-diagonal causal mask when no "
        "attention_mask is given (TRL sends none, and use_cache=False); checked here: a packed row's logits differ "
        f"from its documents' own by at most {isolation:.1e}, documents "
        + ("isolated" if isolated else "NOT ISOLATED: they attend to each other, TRL's SFT figure is not of the same "
           "training") + ". With SDPA on the CPU that mask is dense: every layer computes scores over the whole "
        f"flattened micro-batch ({args.batch_size * args.max_seq_len}^2 per layer) and masks most of them away; "
        "zerostage's attention (model/attention.py, sdpa) runs causal SDPA on each document, Σ Lᵢ² with no mask. "
        "The varlen kernels that skip the masked blocks "
        "(flash_attention_2/3, what TRL recommends for padding-free) need CUDA, and flex_attention's block-sparse "
        "mask has no backward on the CPU in this torch (NotImplementedError); eager isolates the documents too but "
        "builds the same dense mask without a fused kernel. MFU counts only the useful work (attention within each "
        "document) on both sides.",
        f"SFT loss: the same targets (zerostage's loss mask given to TRL as assistant_masks; {data['targets']:,} in "
        f"the store, {data['packed_targets']:,} after TRL's packing). TRL's fused LM head projects every position "
        "on the CPU (compact only on Triton devices) in chunks, and also computes the entropy and top-1 accuracy "
        "of each position for its logged metrics; zerostage projects every position in one piece.",
    ]
    return result


def grpo_comparison(args, config: ModelConfig, tokenizer, differences: list[str]) -> dict:
    store = prepared_split(RL_DATA)
    defaults = grpo_defaults()
    rows = args.prompts_per_step * args.group_size
    print(f"\n[grpo 1/2] zerostage GRPO ({args.prompts_per_step} prompts x {args.group_size} answers of <= "
          f"{args.max_new_tokens} tokens a step)", flush=True)
    zerostage = run_zerostage_grpo(args)
    print("[grpo 2/2] TRL GRPOTrainer", flush=True)
    try:
        trl = run_trl_grpo(args, config, store, tokenizer, load_tokenizer())
    except ImportError as error:
        reason = f"TRL is not installed ({error}); make bench-peer installs requirements-bench.txt"
        print(f"\nGRPO: {reason}")
        return {"zerostage": zerostage, "trl": None, "error": reason}
    result = {"zerostage": zerostage, "trl": trl,
              "ratio_zerostage_over_peer_time_per_prompt": zerostage["seconds_per_prompt"] / trl["seconds_per_prompt"],
              "ratio_peer_over_zerostage_time_per_prompt": trl["seconds_per_prompt"] / zerostage["seconds_per_prompt"]}
    print(f"\nGRPO ({args.prompts_per_step} prompts x {args.group_size} answers a step, {args.grpo_steps} timed steps)")
    for name in ("zerostage", "trl"):
        figures = result[name]
        generation = figures["generation_tokens_per_second"]
        print(f"  {name:11s} {figures['seconds_per_prompt']:7.3f} s per prompt ({figures['seconds_per_step']:.2f} s a "
              f"step), {figures['generated_tokens_per_second']:7.1f} generated tokens/s of the step, "
              + (f"{generation:.1f} of the generation alone" if generation else "generation time unknown")
              + f"; {figures['generated_tokens_per_answer']:.2f} tokens per answer (max {args.max_new_tokens})")
    print(f"  time per prompt, zerostage / trl: {result['ratio_zerostage_over_peer_time_per_prompt']:.2f} "
          f"(TRL takes {result['ratio_peer_over_zerostage_time_per_prompt']:.2f}x zerostage's time)")
    differences += [
        f"GRPO: both sides {rows} answer rows in one micro-batch and one optimizer step per rollout batch (zerostage "
        "--ppo_epochs 1, its default being 2; TRL num_iterations=1, steps_per_generation=1, "
        f"per_device_train_batch_size={rows} completions), rule reward (zerostage's rule_reward on both), k3 KL "
        f"against a frozen reference of weight {defaults['kl_coef']} (TRL beta; use_bias_correction_kl=False, as "
        f"zerostage's term is the plain k3), clip {defaults['clip_range']}, loss normalised by the step's answer "
        "tokens (TRL loss_type='dapo'), rewards standardised within each group (scale_rewards='group').",
        "GRPO log-probs: with one epoch both sides take the old log-probs from the update's own forward (the detached "
        "current ones) and skip a no-grad forward of the policy. Both run the reference's forward. TRL computes the "
        "rewards' and the completions' statistics for its logs each step; zerostage's metrics are collected once a "
        "step (its --log_interval 1 here, outside the step's time).",
        "GRPO generation: zerostage's own KV-cache decoder (model/generate.py) on the policy, each prompt prefilled "
        "once and its keys and values copied to its group's rows; TRL's model.generate (transformers' DynamicCache, "
        "each prompt repeated per answer and left-padded, SDPA with the padding mask). Both sample "
        f"at temperature {defaults['temperature']} without top-k/top-p and stop a row at EOS, the batch when every "
        "row has; the tokens actually generated are counted (EOS included): "
        f"{zerostage['generated_tokens_per_answer']:.2f} per answer on zerostage's side, "
        f"{trl['generated_tokens_per_answer']:.2f} on TRL's (at most {args.max_new_tokens}; an untrained model "
        "rarely says EOS), so the time per prompt is of somewhat different answer lengths where these differ.",
        "GRPO data order: each side draws the same demo RL prompts with its own sampler (zerostage's PromptLoader, "
        "TRL's RepeatSampler); the prompts reach TRL as zerostage tokenized them (its _tokenize_prompts returns "
        "zerostage's ids).",
    ]
    return result


def dpo_comparison(args, config: ModelConfig, tokenizer, differences: list[str]) -> dict:
    """zerostage DPO against TRL's DPOTrainer; the reason when TRL cannot run here."""
    examples, unsupervised = preference_examples(prepared_split(DPO_DATA, args.dpo_max_seq_len))
    try:
        import trl  # noqa: F401
    except ImportError as error:
        reason = f"TRL is not installed ({error}); make bench-peer installs requirements-bench.txt"
        print(f"\nDPO skipped: {reason}")
        return {"error": reason}
    print(f"\n[dpo 1/2] zerostage DPO ({args.zerostage_packing})", flush=True)
    # packed: --batch_size counts rows of whole pairs, as SFT's counts rows.
    launch, records, _ = run_zerostage("dpo", args, ["--beta", str(BETA), "--dpo_loss", "sigmoid",
                                                     "--learning_rate", str(DPO_LR),
                                                     "--packing", args.zerostage_packing],
                                       batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                                       max_seq_len=args.dpo_max_seq_len)
    zerostage_dpo = token_rate(records, args.warmup, args.steps)
    zerostage_dpo.pop("record")
    zerostage_dpo.update(launch)
    print("[dpo 2/2] TRL DPOTrainer", flush=True)
    try:
        trl_dpo = run_trl_dpo(args, config, examples, tokenizer)
    except Exception as error:  # the other comparisons stand without it; the reason goes into the output
        reason = f"TRL DPOTrainer failed on this CPU: {type(error).__name__}: {error}"
        print(f"\nDPO: {reason}")
        return {"zerostage": zerostage_dpo, "error": reason}
    result = {"zerostage": zerostage_dpo, "trl": trl_dpo,
              "ratio_zerostage_over_peer": zerostage_dpo["tokens_per_second"] / trl_dpo["tokens_per_second"]}
    print_rates(f"DPO (chosen + rejected real tokens, length {args.dpo_max_seq_len})", result, "trl")
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
    try:  # the peers' progress bars (dataset maps, weight loading) would bury the figures
        import datasets
        import transformers
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    config = ModelConfig.from_preset("small")
    tokenizer = load_tokenizer()
    peer_params = sum(p.numel() for p in peer_model(config).parameters())
    print(f"model: zerostage small {num_params(config):,} parameters, LlamaForCausalLM {peer_params:,}; fp32, "
          f"{args.threads} threads; parts {', '.join(args.parts)}", flush=True)
    if "sft" in args.parts or "dpo" in args.parts:
        print(f"  SFT/DPO: {args.warmup} warm-up + {args.steps} timed steps, micro-batch {args.batch_size}, SFT rows "
              f"of {args.max_seq_len}, DPO length {args.dpo_max_seq_len}", flush=True)
    if "grpo" in args.parts:
        print(f"  GRPO: {args.grpo_warmup} warm-up + {args.grpo_steps} timed steps, {args.prompts_per_step} prompts x "
              f"{args.group_size} answers of <= {args.max_new_tokens} tokens a step", flush=True)
    hf = hf_tokenizer(tokenizer.pad_id, tokenizer.eos_id)
    differences = [
        ("Engine: zerostage runs under DeepSpeed ZeRO-0 (the default on one rank) with one CPU rank, stepping torch's "
         "fused AdamW itself, as the peers do under accelerate without DeepSpeed (the Trainer's default optimizer)."
         if args.zero_stage in ("auto", "0") else
         f"Engine: zerostage runs under DeepSpeed ZeRO-{args.zero_stage} with one CPU rank: torch AdamW (foreach) "
         "stepped by DeepSpeed's ZeRO optimizer on its flat fp32 partition; the peers under accelerate without "
         "DeepSpeed, with the Trainer's default optimizer (torch's fused AdamW).")
        + " TRL's default activation checkpointing and bf16 are turned off, so both sides run fp32 without "
        "recomputation.",
        "Data order: each side shuffles the same training data with its own sampler, so the timed steps see "
        "different (equally distributed) documents; the figures are per real token (per prompt for GRPO), not per "
        "step.",
        "Model code: zerostage's own Transformer (SDPA causal on each document) vs transformers' LlamaForCausalLM; "
        "same dimensions, parameter count and dtype, initial weights drawn differently.",
        "zerostage's runs also write a final checkpoint, export and one evaluation batch; they fall after its timed "
        "window, as the peers' set-up and teardown fall outside theirs.",
    ]
    result = {"settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "dtype": "fp32",
                           "sft_data": SFT_DATA, "dpo_data": DPO_DATA, "rl_data": RL_DATA,
                           "cpu_count": os.cpu_count()},
              "versions": versions(), "parameters": {"zerostage": num_params(config), "peer": peer_params}}
    for part in args.parts:
        run = {"sft": sft_comparison, "grpo": grpo_comparison, "dpo": dpo_comparison}[part]
        result[part] = run(args, config, hf, differences)
    result["differences"] = differences
    print("\ndifferences:")
    for line in differences:
        print(f"  - {line}")
    out = REPO_ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
