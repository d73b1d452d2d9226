"""`--activation_checkpointing`: each transformer block keeps only its input, and the backward runs its forward
again to get the activations it needs (torch.utils.checkpoint, non-reentrant), for one more forward of the blocks.

Applied in place, as torchtitan's apply_ac: the block's forward is replaced (no wrapper module, so parameter names
and checkpoints are unchanged), before --compile compiles that forward and before FSDP2's fully_shard hooks the block,
so the recomputation runs inside the sharded block on the parameters its backward has gathered anyway. DeepSpeed's
own checkpointing API (deepspeed.checkpointing) is the reentrant Megatron one, made for model parallelism; this one
serves ZeRO 0-3 and FSDP alike. Decoding with a KV cache and forwards without gradients run as before.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from model.model import Block


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Make every transformer block of `model` recompute its forward in the backward; returns how many there are."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.forward = _checkpointed_forward(block.forward)
    return len(blocks)


def _checkpointed_forward(forward):
    def checkpointed(h, cos, sin, mask, kv_cache):
        if kv_cache is not None or not torch.is_grad_enabled():
            return forward(h, cos, sin, mask, kv_cache)
        return checkpoint(forward, h, cos, sin, mask, kv_cache, use_reentrant=False)
    return checkpointed
