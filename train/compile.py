"""`--compile`: torch.compile per transformer block, as torchtitan does.

Each block's forward is compiled in place (no wrapper module, so parameter names and checkpoints are unchanged).
All blocks share one graph (parameters are graph inputs, not constants), and the engine's hooks stay outside it:
DeepSpeed ZeRO 0-2 hook parameters and gradients, FSDP2 shards at block granularity. ZeRO-3 is refused in
train/deepspeed_backend.py: its parameter hooks sit on every submodule, inside the block, and break its graph
apart; so is a mixture-of-experts FFN, whose routing breaks it at every expert.

Decoding with a KV cache (generation, PPO/GRPO rollouts) stays eager: the cache's length changes every token and
the cache object is mutated, which would retrace the block at every length.
"""
from __future__ import annotations

import time

import torch

from model.attention import DocumentMask, resolve_impl
from model.model import Block
from train import distributed
from train.config import ConfigError

# Traces of the block one run is expected to need: training and evaluation (grad mode and dropout differ), each
# first for the first sequence length seen and, once it changes (SFT/DPO trim padding per batch), once more with
# the length dynamic (`dynamic=None`). RL stages add a few more (no-grad scoring in train mode, the critic).
EXPECTED_TRACES = 4
_traces = {"count": 0, "warned": False}
_compiling = {"seconds": 0.0, "since": None}  # host time inside torch.compile, outermost compiles only


def compile_seconds() -> float:
    """Host seconds this process has spent compiling (dynamo traces and the backward graphs compiled on first use):
    train/metrics.py leaves them out of the rate window they fall in, as a recompile is not a training step's cost."""
    return _compiling["seconds"]


def trace_count() -> int:
    """Frames torch.compile has traced in this process since the first compile_blocks."""
    return _traces["count"]


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile the forward of every transformer block of `model`; returns how many there are."""
    from torch._dynamo.callback import callback_handler, on_compile_end, on_compile_start

    if _count_trace not in callback_handler.end_callbacks:
        on_compile_start(_compile_started)
        on_compile_end(_count_trace)
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    if any(block.use_moe for block in blocks):
        # Measured on tiny-moe: six graphs per block, each expert's routed tokens (a data-dependent shape) a break.
        raise ConfigError("--compile: not supported for mixture-of-experts models (--model moe, tiny-moe): routing "
                          "tokens to each expert has data-dependent shapes, which break the compiled block apart at "
                          "every expert; use a dense model or --compile false")
    for block in blocks:
        block.forward = _compiled_forward(block)
    return len(blocks)


def _compiled_forward(block: Block):
    eager, compiled = block.forward, torch.compile(block.forward, dynamic=None)

    def forward(h, cos, sin, mask: DocumentMask, kv_cache):
        if kv_cache is not None:
            return eager(h, cos, sin, mask, kv_cache)
        if not mask.causal_only:
            # Lay out the documents all layers share here, eagerly: built on first use (varlen and documents are
            # cached_properties, whose lock on Python 3.11 splits a graph) and partly on the host. The compiled
            # attention reads them as op inputs.
            impl = resolve_impl(block.attn.attn_impl, h, h)
            _ = mask.varlen if impl == "flash" else mask.dense if impl == "math" else mask.documents
        return compiled(h, cos, sin, mask, kv_cache)
    return forward


def _compile_started(args) -> None:
    _compiling["since"] = time.perf_counter()


def _count_trace(args) -> None:
    """Ends a compile's clock, and counts every frame dynamo traces: a retrace, or the piece after a graph break."""
    from torch._dynamo.callback import CallbackTrigger

    if _compiling["since"] is not None:
        _compiling["seconds"] += time.perf_counter() - _compiling["since"]
        _compiling["since"] = None
    if args.callback_trigger != CallbackTrigger.DYNAMO:  # backward graphs compiled later are not retraces
        return
    _traces["count"] += 1
    if _traces["count"] > EXPECTED_TRACES and not _traces["warned"] and distributed.is_main():
        _traces["warned"] = True
        print(f"WARNING: --compile: torch.compile has traced the transformer block {_traces['count']} times "
              f"(expected about {EXPECTED_TRACES}); each retrace is another compile, and past "
              f"{torch._dynamo.config.recompile_limit} the block runs eager. TORCH_LOGS=recompiles,graph_breaks "
              f"names the guard that failed or the code that split the graph.", flush=True)
