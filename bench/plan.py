"""Size a training job before queueing it: per-rank memory and per-step communication of a pretrain/SFT step.

    python -m bench.plan --model base --world_size 64 --backend zero3 --batch_size 8 --seq_len 4096 --dtype bf16 \\
        [--activation_checkpointing] [--loss_chunk_tokens 1024] [--accumulation_steps 1] [--device cuda|cpu]

--model is a preset or a config.json (ModelConfig fields, or a Hugging Face config). --backend zero0..zero3 or fsdp.
Every term is counted from the tensors zerostage and DeepSpeed 0.19.8 / FSDP2 allocate, in the dtypes of
docs/precision.md; the assumptions are printed with the table. Byte counts are exact for the model state (the
parameter shapes come from the model itself, built on the meta device) and derived for the activations (what a
forward saves for its backward, checked against autograd in tests/test_plan.py).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import ModelConfig
from model.hf import config_from_hf

BACKENDS = ("zero0", "zero1", "zero2", "zero3", "fsdp")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
# ds_configs/zero2.json and zero3.json: reduce/all-gather buckets, ZeRO-3 prefetch bucket and persistence threshold.
REDUCE_BUCKET = 50_000_000
PREFETCH_BUCKET = 50_000_000
PERSISTENCE_THRESHOLD = 100_000


@dataclass
class Job:
    config: ModelConfig
    world_size: int
    backend: str
    batch_size: int  # micro-batch rows per rank
    seq_len: int
    dtype: str = "fp32"
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 0
    accumulation_steps: int = 1
    device: str = "cuda"  # cpu: foreach AdamW (a temporary per state tensor); cuda: fused AdamW

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class Plan:
    memory: list[tuple[str, int, str]]  # (term, bytes per rank, how it is counted)
    peak: int  # bytes per rank at the step's highest point
    communication: list[tuple[str, int, str]]  # (collective, bytes sent per rank per optimizer step, note)
    assumptions: list[str] = field(default_factory=list)

    @property
    def communication_total(self) -> int:
        return sum(size for _, size, _ in self.communication)


def parameter_sizes(config: ModelConfig) -> dict[str, int]:
    """name -> elements of every parameter, tied ones once: the model itself, built without memory."""
    from model.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    return {name: p.numel() for name, p in model.named_parameters()}


def block_params(config: ModelConfig, sizes: dict[str, int]) -> int:
    return sum(n for name, n in sizes.items() if name.startswith("layers.0."))


def activation_bytes_per_token_layer(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes one transformer block keeps for its backward per token (dense block, dropout 0), as autograd saves them:
    each RMSNorm (eager, decomposed) its input upcast to fp32, the fp32 normalised input, the fp32 reciprocal RMS and
    its output in the model dtype (the next projection's input); the rotated q and k and v (SDPA's inputs), SDPA's
    output and fp32 log-sum-exp per head, the concatenated output (o_proj's input); SwiGLU's gate, silu(gate), up and
    their product. Rotary keeps only the cos/sin tables (once per forward, not per layer); per-document SDPA keeps no
    T² scores or mask. q/k norm (minimind3) adds the same fp32 pair for q and k and an rstd per head."""
    hidden, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    model_dtype = 2 * hidden + (hidden + 2 * kv) + 2 * hidden + 4 * config.intermediate_size
    fp32 = 2 * (2 * hidden + 1) + config.num_heads
    if config.qk_norm:
        fp32 += 2 * (hidden + kv) + config.num_heads + config.num_kv_heads
    return model_dtype * dtype_bytes + fp32 * FP32


def top_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes per token saved outside the blocks: the token ids (int64, the embedding's), RoPE's fp32 cos and sin,
    the final norm's fp32 pair and rstd and its output (the LM head's input)."""
    return 8 + 2 * config.head_dim * FP32 + (2 * config.hidden_size + 1) * FP32 + config.hidden_size * dtype_bytes


def loss_peak_bytes(config: ModelConfig, tokens: int, chunk_tokens: int) -> int:
    """The cross-entropy's highest point, at the start of its backward: log_softmax's saved fp32 output, the fp32
    gradient nll_loss hands it and the fp32 gradient it makes, [positions, vocab] each; with --loss_chunk_tokens the
    positions of one chunk (recomputed in the backward), never all of them."""
    positions = min(chunk_tokens, tokens) if chunk_tokens else tokens
    return 3 * positions * config.vocab_size * FP32


def activations(job: Job) -> tuple[int, int, str]:
    """(bytes kept for the backward, the loss's extra peak on top of them, note)."""
    config, b = job.config, job.bytes
    per_layer = activation_bytes_per_token_layer(config, b) * job.tokens
    top = top_bytes_per_token(config, b) * job.tokens
    loss = loss_peak_bytes(config, job.tokens, job.loss_chunk_tokens)
    if not job.activation_checkpointing:
        return config.num_layers * per_layer + top, loss, \
            f"{config.num_layers} blocks × {activation_bytes_per_token_layer(config, b):,} B/token + top"
    # Checkpointed: each block keeps its input; the backward rebuilds one block's activations at a time and holds up
    # to three I-wide gradients of SwiGLU beside them (fitted to bench/memory.py's peaks within 7%, not derived).
    # The loss's peak is over before the first recomputation, so the larger of the two counts.
    kept = config.num_layers * config.hidden_size * b * job.tokens + top
    block = per_layer + 3 * config.intermediate_size * b * job.tokens
    return kept, max(loss, block), f"{config.num_layers} block inputs + one block recomputed"


# When a buffer is alive, relative to the activations: kept for the whole step; beside them (summed with them);
# filling as the backward frees them (gradients made block by block: the larger of the two counts); the optimizer step.
PHASES = {"persistent": "", "beside": " [fwd/bwd]", "filling": " [bwd, as activations free]", "step": " [step]"}


def model_state(job: Job, sizes: dict[str, int]) -> dict[str, list[tuple[str, int, str]]]:
    """phase (PHASES) -> [(term, bytes, source)]. DeepSpeed's buffers are read off its 0.19.8 source
    (stage_1_and_2.py, stage3.py): what it allocates, in which dtype, for how long."""
    P, N, b = sum(sizes.values()), job.world_size, job.bytes
    shard = math.ceil(P / N)
    block = block_params(job.config, sizes)
    cpu = job.device == "cpu"
    # A GPU allocator holds ZeRO-2's bucket whole from the backward's start; on a CPU only the pages written count, at
    # most the model's gradients, written as the activations are freed (measured: bench/scaling.py).
    bucket = min(REDUCE_BUCKET, P) if cpu else REDUCE_BUCKET
    # torch's foreach AdamW (CPU) makes one fp32 temporary per state tensor (sqrt of the second moment); fused: none.
    adam_temp = [("AdamW temporary (foreach)", shard * FP32, "CPU only")] if cpu else []
    stage, dtype = job.backend, job.dtype
    if stage == "zero0":
        if dtype == "fp32":
            return {"persistent": [("parameters (fp32, replicated)", P * FP32, "the module's weights are the masters"),
                                   ("Adam moments (fp32, replicated)", 2 * P * FP32, "fused AdamW")],
                    "filling": [("gradients (fp32, replicated)", P * FP32, "all-reduced in place")]}
        return {"persistent": [(f"parameters ({dtype}, replicated)", P * b, ""),
                               ("fp32 masters (replicated)", P * FP32, "FP16_UnfusedOptimizer's fp32_groups"),
                               ("Adam moments (fp32, replicated)", 2 * P * FP32, "")],
                "filling": [(f"gradients ({dtype}, replicated)", P * b, "accumulated in the model dtype at ZeRO-0")],
                "step": [("fp32 gradients for the step", P * FP32, "the wrapper's fp32 copy")]}
    if stage in ("zero1", "zero2"):
        persistent = [(f"parameters ({dtype}, replicated)", P * b, "DeepSpeed's flat buffer"),
                      ("fp32 master partition", shard * FP32, "cloned from the flat buffer, fp32 runs too"),
                      ("Adam moments (fp32, partitioned)", 2 * shard * FP32, "")]
        if stage == "zero1":
            # BF16_Optimizer (bf16) and the grad_accum attribute (fp16, fp32: param.grad) hold whole fp32 gradients.
            return {"persistent": persistent + [("gradients (fp32, replicated)", P * FP32, "reduced at the step")],
                    "step": [("fp32 gradient partition for the step", shard * FP32, "")] + adam_temp}
        bucket_term = (f"reduce bucket ({dtype})", bucket * b, f"{REDUCE_BUCKET:.0e} elements, each backward")
        return {"persistent": persistent,
                "beside": [] if cpu else [bucket_term],
                "filling": ([bucket_term] if cpu else []) + [(f"gradient partition ({dtype})", shard * b,
                                                              "grads_in_partition")],
                "step": [("fp32 gradient partition for the step", shard * FP32, "the masters' .grad, flattened")]
                + adam_temp}
    if stage == "zero3":
        small = sum(n for n in sizes.values() if n < PERSISTENCE_THRESHOLD)
        return {"persistent": [(f"parameter partition ({dtype})", shard * b, "ds_tensor"),
                               (f"small parameters ({dtype}, replicated)", small * b,
                                f"under {PERSISTENCE_THRESHOLD:.0e} elements: never partitioned"),
                               ("fp32 master partition", shard * FP32, ""),
                               ("Adam moments (fp32, partitioned)", 2 * shard * FP32, ""),
                               ("gradient partition (fp32)", shard * FP32, "grad_partitions_flat_buffer"),
                               ("reduce bucket (fp32)", bucket * FP32, f"{REDUCE_BUCKET:.0e} elements, made at start-up")],
                "beside": [(f"gathered parameters ({dtype})", min(P, block + PREFETCH_BUCKET) * b,
                            f"a block + the {PREFETCH_BUCKET:.0e}-element prefetch, at most the model")],
                "step": adam_temp}
    # FSDP2: the fp32 shards are the masters; the root (embedding / tied head, final norm) stays gathered from its
    # forward to its backward; the backward gathers a block (and prefetches the next) and makes its gradients unsharded,
    # copied into the fp32 reduce-scatter input, one block at a time as it frees the activations (measured: these peak
    # against the activations and the loss's peak, not on top of them).
    root = P - job.config.num_layers * block
    return {"persistent": [("parameter shards (fp32 masters)", shard * FP32, "DTensor shards"),
                           ("Adam moments (fp32, sharded)", 2 * shard * FP32, ""),
                           ("gradient shards (fp32)", shard * FP32, "reduce_dtype fp32")],
            "beside": [(f"gathered root parameters ({dtype})", root * b, "embedding / tied head, final norm")],
            "filling": [(f"two gathered blocks ({dtype})", 2 * block * b, "the block and the prefetched next"),
                        ("a block's unsharded gradients", block * b + block * FP32,
                         f"{dtype} + the fp32 reduce-scatter input")],
            "step": adam_temp}


def communication(job: Job, sizes: dict[str, int]) -> list[tuple[str, int, str]]:
    """Bytes each rank sends per optimizer step in ring collectives: an all-reduce of S bytes sends 2·(N−1)/N·S,
    an all-gather or reduce-scatter (N−1)/N·S. Gradients travel in fp32 (communication_data_type, reduce_dtype)."""
    P, N, b, micro = sum(sizes.values()), job.world_size, job.bytes, job.accumulation_steps
    ring = (N - 1) / N
    grads = P * FP32
    if N == 1:
        return []
    if job.backend in ("zero0", "zero1"):
        out = [("gradient all-reduce", int(2 * ring * grads), "once per step")]
        if job.backend == "zero1":
            out.append(("parameter all-gather", int(ring * P * b), "updated partitions, once per step"))
        return out
    if job.backend == "zero2":
        return [("gradient reduce-scatter", int(ring * grads * micro), "every micro-batch"),
                ("parameter all-gather", int(ring * P * b), "updated partitions, once per step")]
    if job.backend == "zero3":
        gathered = P - sum(n for n in sizes.values() if n < PERSISTENCE_THRESHOLD)
        return [("parameter all-gather, forward", int(ring * gathered * b * micro), "every micro-batch"),
                ("parameter all-gather, backward", int(ring * gathered * b * micro), "every micro-batch"),
                ("gradient reduce-scatter", int(ring * grads * micro), "every micro-batch")]
    root = P - job.config.num_layers * block_params(job.config, sizes)
    return [("parameter all-gather, forward", int(ring * P * b * micro), "every micro-batch"),
            ("parameter all-gather, backward", int(ring * (P - root) * b * micro), "the root stays gathered"),
            ("gradient reduce-scatter", int(ring * grads * micro), "every micro-batch")]


def plan(job: Job) -> Plan:
    if job.config.use_moe or job.config.dropout:
        raise ValueError("the plan models dense blocks without dropout (every preset but the MoE ones)")
    if job.backend == "fsdp" and job.dtype == "fp16":
        raise ValueError("--backend fsdp refuses fp16 (docs/precision.md)")
    sizes = parameter_sizes(job.config)
    phases = model_state(job, sizes)
    kept, loss_extra, note = activations(job)
    loss_note = (f"[{min(job.loss_chunk_tokens or job.tokens, job.tokens):,} × {job.config.vocab_size:,}] fp32 × 3"
                 if loss_extra == loss_peak_bytes(job.config, job.tokens, job.loss_chunk_tokens)
                 else "one block recomputed, with its backward")
    phases["beside"] = [(f"activations ({job.dtype}, {job.tokens:,} tokens a rank)", kept, note),
                        ("loss / recomputation peak", loss_extra, loss_note)] + phases.get("beside", [])
    total = {phase: sum(size for _, size, _ in phases.get(phase, [])) for phase in PHASES}
    memory = [(name + PHASES[phase], size, note) for phase in PHASES for name, size, note in phases.get(phase, [])]
    # The backward starts with every activation and ends with every gradient: the larger of the two, plus the rest.
    forward_backward = total["beside"] - (kept + loss_extra) + max(kept + loss_extra, total["filling"])
    highest = total["persistent"] + max(forward_backward, total["step"])
    assumptions = [
        f"model: {sum(sizes.values()):,} parameters ({job.config.num_layers} blocks of "
        f"{block_params(job.config, sizes):,}), counted on the model built on the meta device",
        f"{job.backend} at {job.world_size} ranks, micro-batch {job.batch_size} × {job.seq_len} tokens, {job.dtype} "
        f"compute, fp32 masters and Adam moments, gradients reduced in fp32 (docs/precision.md)",
        "peak = persistent terms + the larger of the backward's start and end (everything [fwd/bwd], with the "
        "activations and loss peak or the gradients [bwd, as activations free], whichever is larger) and the "
        "optimizer [step]",
        f"ZeRO buckets as ds_configs/: reduce {REDUCE_BUCKET:.0e}, prefetch {PREFETCH_BUCKET:.0e}, persistence "
        f"{PERSISTENCE_THRESHOLD:.0e} elements; on a CPU a bucket counts only the pages written (at most the model)",
        f"device {job.device}: " + ("foreach AdamW, one temporary a state tensor" if job.device == "cpu" else
                                    "fused AdamW, buckets allocated whole"),
        "activations: packed rows, per-document SDPA (flash-attn's varlen saves the same q, k, v, output and "
        "log-sum-exp), eager RMSNorm, dense blocks, dropout 0",
        "not counted: the framework's own memory (CUDA context, NCCL buffers, allocator caching and fragmentation; on "
        "a CPU the interpreter, libraries and data: bench/scaling.py measures it), collectives' temporaries, MoE, "
        "offload",
    ]
    return Plan(memory, highest, communication(job, sizes), assumptions)


def load_config(name: str, seq_len: int) -> ModelConfig:
    path = Path(name)
    if path.suffix == ".json" or path.is_file():
        values = json.loads(path.read_text(encoding="utf-8"))
        if "model_type" in values:
            return config_from_hf(values, str(path))
        return ModelConfig.from_dict({**values, "max_seq_len": max(values.get("max_seq_len", 0), seq_len)}, str(path))
    preset = ModelConfig.from_preset(name)
    return ModelConfig.from_preset(name, max_seq_len=max(preset.max_seq_len, seq_len))


def gb(size: int) -> str:
    return f"{size / 1e9:,.3f}"


def render(job: Job, result: Plan) -> str:
    width = max(len(name) for name, _, _ in result.memory + result.communication) + 2
    lines = [f"Per-rank memory, GB (10⁹ bytes): {job.backend}, {job.world_size} ranks, {job.dtype}, micro-batch "
             f"{job.batch_size} × {job.seq_len}" + (", activation checkpointing" if job.activation_checkpointing
                                                     else "") + f", {job.device}"]
    lines += [f"  {name:<{width}} {gb(size):>10}  {note}" for name, size, note in result.memory]
    lines.append(f"  {'peak per rank':<{width}} {gb(result.peak):>10}  (+ the framework's own memory)")
    lines.append(f"\nCommunication per optimizer step ({job.accumulation_steps} micro-batch"
                 f"{'es' if job.accumulation_steps > 1 else ''}), GB sent per rank:")
    lines += [f"  {name:<{width}} {gb(size):>10}  {note}" for name, size, note in result.communication]
    lines.append(f"  {'total':<{width}} {gb(result.communication_total):>10}")
    lines.append("\nAssumptions:")
    lines += [f"  - {text}" for text in result.assumptions]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="a preset or a config.json")
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--backend", choices=BACKENDS, default="zero2")
    parser.add_argument("--batch_size", type=int, default=1, help="micro-batch rows per rank")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="fp32")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--loss_chunk_tokens", type=int, default=0)
    parser.add_argument("--accumulation_steps", type=int, default=1)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    job = Job(load_config(args.model, args.seq_len), args.world_size, args.backend, args.batch_size, args.seq_len,
              args.dtype, args.activation_checkpointing, args.loss_chunk_tokens, args.accumulation_steps, args.device)
    print(render(job, plan(job)))


if __name__ == "__main__":
    main()
