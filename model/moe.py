"""Mixture-of-experts FFN: top-k routed SwiGLU experts plus always-on shared experts
(DeepSeekMoE-style, as in MiniMind-MoE), with the Switch Transformer load-balancing loss."""

import torch
from torch import nn

from model.config import ModelConfig
from model.feedforward import SwiGLU


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.intermediate_size) for _ in range(config.num_shared_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (output [B, T, H], unscaled load-balancing loss, a scalar)."""
        tokens = x.flatten(0, 1)
        probs = self.router(tokens).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            # Mixing weights sum to 1; a lone weight is left as is, else it would be the constant 1
            # and the router would get no gradient from the language-model loss.
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)

        # Each expert runs only on the tokens routed to it, so compute scales with top_k, not num_experts:
        # the routed slots sorted by expert (stably, each expert's tokens in order), then cut per expert.
        flat = chosen.flatten()
        counts = torch.zeros_like(self.router.weight[:, 0], dtype=torch.long).scatter_add_(
            0, flat, torch.ones_like(flat))
        order = flat.argsort(stable=True)
        token = order // self.top_k
        # The layer's one host sync: eager kernels need each expert's token count as a host int; a fixed
        # per-expert capacity would not need it but drops or pads tokens, changing results or cost.
        parts = tokens.index_select(0, token).split(counts.tolist())
        # An expert that got no tokens still runs on an empty batch, keeping its parameters in the graph for
        # data-parallel gradient hooks.
        routed = torch.cat([expert(part) for expert, part in zip(self.experts, parts)])
        out = torch.zeros_like(tokens).index_add_(0, token, routed * weights.flatten()[order, None])
        for expert in self.shared_experts:
            out = out + expert(tokens)
        return out.view_as(x), self._balance_loss(probs, counts)

    def _balance_loss(self, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """num_experts * sum_e (fraction of routed slots sent to e) * (mean router probability of e).

        Equals 1 when routing is uniform and grows as it concentrates; only the probability
        term carries gradient, pushing the router away from overloaded experts.
        """
        load = counts.to(probs.dtype) / counts.sum()
        return probs.shape[-1] * (load * probs.mean(dim=0)).sum()
