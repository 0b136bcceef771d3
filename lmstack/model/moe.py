"""Mixture-of-Experts feed-forward (Mixtral-style): top-k routing and the load-balancing loss.

The router softmaxes in float32, keeps the top-k experts per token and renormalises their
weights (Mixtral's rule); each expert is a SwiGLU MLP. A token's k weighted expert outputs are
summed in float32 and rounded to the model's dtype once, as transformers' default (grouped_mm)
experts path does: bf16 outputs then equal transformers' bit for bit. The auxiliary loss is the
Switch Transformer balance term, computed over all layers' router logits as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.model.mlp import SwiGLU


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output and the router logits (tokens, num_experts) for the balance loss."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        router_logits = self.router(flat)
        probs = F.softmax(router_logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # a float32 accumulator (the weights are float32): rounding each expert's share to bf16 before
        # the sum, as transformers' eager experts path does, differs from its default path in the last bit
        out = torch.zeros(flat.shape, dtype=torch.promote_types(flat.dtype, weights.dtype), device=flat.device)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)
            out.index_add_(0, token_idx, expert(flat[token_idx]) * weights[token_idx, slot, None])
        return out.to(flat.dtype).view(shape), router_logits


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """num_experts * sum_e (fraction of routed slots to e) * (mean router probability of e).

    Equals 1.0 * top_k for perfectly uniform routing; `token_mask` (tokens,) excludes padding.
    """
    device = router_logits[0].device
    routed = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    mask = token_mask.reshape(-1).float().to(device) if token_mask is not None else None
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        if mask is None:
            routed = routed + F.one_hot(chosen, num_experts).float().sum(dim=(0, 1))
            prob_sum = prob_sum + probs.sum(dim=0)
            rows = rows + probs.shape[0]
        else:
            routed = routed + (F.one_hot(chosen, num_experts).float() * mask[:, None, None]).sum(dim=(0, 1))
            prob_sum = prob_sum + (probs * mask[:, None]).sum(dim=0)
            rows = rows + mask.sum()
    return num_experts * torch.sum((routed / rows) * (prob_sum / rows))
