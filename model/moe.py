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

        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            # Each expert runs only on the tokens routed to it, so compute scales with top_k, not
            # num_experts. An expert that got no tokens still runs on an empty batch, keeping its
            # parameters in the graph for data-parallel gradient hooks.
            token, slot = torch.where(chosen == index)
            out.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None])
        for expert in self.shared_experts:
            out = out + expert(tokens)
        return out.view_as(x), self._balance_loss(probs, chosen)

    def _balance_loss(self, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """num_experts * sum_e (fraction of routed slots sent to e) * (mean router probability of e).

        Equals 1 when routing is uniform and grows as it concentrates; only the probability
        term carries gradient, pushing the router away from overloaded experts.
        """
        num_experts = probs.shape[-1]
        load = torch.bincount(chosen.flatten(), minlength=num_experts).to(probs.dtype) / chosen.numel()
        return num_experts * (load * probs.mean(dim=0)).sum()
