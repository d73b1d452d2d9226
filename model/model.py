"""MiniMind-style decoder-only transformer: the Llama recipe at small scale.

Each block is pre-norm:  h = h + Attention(RMSNorm(h));  h = h + FFN(RMSNorm(h)),
with rotary positions and grouped-query attention, and a SwiGLU or mixture-of-experts FFN.
Packed rows are supported natively: `doc_ids` keeps attention inside each document and
`position_ids` restarts the rotary positions at each document start.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import DocumentMask, Documents, attend
from model.config import ModelConfig
from model.feedforward import SwiGLU
from model.kv_cache import KVCache
from model.moe import MoE
from model.rope import apply_rotary, rotary_angles


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab]; None when return_hidden was asked
    hidden: torch.Tensor | None = None  # [B, T, hidden] after the final norm, when return_hidden
    # MoE load-balancing loss summed over layers and scaled by moe_aux_loss_coef, ready to add to
    # the training loss; None for a dense model.
    aux_loss: torch.Tensor | None = None
    kv_cache: KVCache | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask: DocumentMask, kv_cache: KVCache | None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)
        out = attend(q, k, v, mask, self.attn_impl, self.dropout if self.training else 0.0)
        return self.o_proj(out.flatten(2))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.use_moe = config.use_moe
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer_index)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn = MoE(config) if config.use_moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, h, cos, sin, mask, kv_cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = h + self.resid_dropout(self.attn(self.attn_norm(h), cos, sin, mask, kv_cache))
        if self.use_moe:
            ffn_out, balance_loss = self.ffn(self.ffn_norm(h))
        else:
            ffn_out, balance_loss = self.ffn(self.ffn_norm(h)), None
        return h + self.resid_dropout(ffn_out), balance_loss


class Transformer(nn.Module):
    # When embeddings are tied, the checkpoint stores the shared matrix once, under the value's name.
    tied_weights = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, index) for index in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self):
        """GPT-2 init: N(0, init_std) everywhere, except the projections that write into the
        residual stream, shrunk by 1/sqrt(2 * num_layers) so its variance does not grow with depth."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_output = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_output else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                return_hidden: bool = False, documents: Documents | None = None) -> ModelOutput:
        """input_ids [B, T] -> logits [B, T, vocab] (or final hidden states with return_hidden).

        doc_ids [B, T]: document index of each token in its row, -1 for padding; a token attends
            causally to earlier tokens of its own document only. None: one document per row.
        position_ids [B, T]: rotary positions, restarting at 0 for each packed document.
            None: 0..T-1, continuing after the cached tokens when decoding.
        kv_cache: keys and values of earlier calls; this call's tokens follow them.
        documents: where doc_ids' documents lie, worked out on the host (Documents of the CPU doc_ids);
            without it the fused kernels read doc_ids back from the device once per forward. Not used
            with kv_cache (decoding masks a few queries explicitly).
        """
        batch, seq_len = input_ids.shape
        start = 0
        if kv_cache is None:
            mask = DocumentMask(doc_ids, documents=documents)
        else:
            doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids
            start = kv_cache.length
            mask = DocumentMask(doc_ids, kv_cache.append_doc_ids(doc_ids))
        if position_ids is None:
            position_ids = torch.arange(start, start + seq_len, device=input_ids.device).expand(batch, -1)
        cos, sin = rotary_angles(position_ids, self.config.head_dim, self.config.rope_theta)

        h = self.embed(input_ids)
        balance_losses = []
        for layer in self.layers:
            h, balance_loss = layer(h, cos, sin, mask, kv_cache)
            balance_losses.append(balance_loss)
        h = self.norm(h)

        aux_loss = None
        if self.config.use_moe:
            aux_loss = self.config.moe_aux_loss_coef * torch.stack(balance_losses).sum()
        if return_hidden:
            return ModelOutput(logits=None, hidden=h, aux_loss=aux_loss, kv_cache=kv_cache)
        return ModelOutput(logits=self.logits_from_hidden(h), aux_loss=aux_loss, kv_cache=kv_cache)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (as returned with return_hidden) -> logits over the vocabulary."""
        return self.lm_head(hidden)

    def label_logps(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 0,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([N] log p(label) in fp32, 0 where the label is -100; [N] entropy of p, or None) from final hidden states
        [N, hidden] and labels [N].

        chunk_tokens > 0: the LM head and its softmax run over chunks of that many positions, each under
        torch.utils.checkpoint, so the backward recomputes a chunk's logits instead of keeping them: at most
        [chunk_tokens, vocab] logits exist at once, never [N, vocab], for one more LM-head forward. 0: one chunk, kept.
        """
        if not chunk_tokens:
            return self._chunk_logps(hidden, labels, with_entropy)
        recompute = torch.is_grad_enabled()  # without a backward there is nothing to keep, nor to recompute
        chunks = [checkpoint(self._chunk_logps, part, part_labels, with_entropy, use_reentrant=False) if recompute
                  else self._chunk_logps(part, part_labels, with_entropy)
                  for part, part_labels in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens))]
        logps = torch.cat([chunk_logps for chunk_logps, _ in chunks])
        return logps, torch.cat([entropy for _, entropy in chunks]) if with_entropy else None

    def _chunk_logps(self, hidden, labels, with_entropy: bool):
        logits = self.lm_head(hidden).float()
        logps = -F.cross_entropy(logits, labels, reduction="none")  # ignore_index -100: 0
        if not with_entropy:
            return logps, None
        log_norm = logits.logsumexp(dim=-1)
        return logps, log_norm - (logits.softmax(dim=-1) * logits).sum(dim=-1)
