"""Normalisation layers: RMSNorm (Llama/Qwen/Mistral) and LayerNorm (GPT-2).

RMSNorm normalises in float32 and casts back before the weight multiply, exactly as the
Hugging Face implementations do, so bf16 outputs match theirs bit for bit where possible.
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    norm_fn = staticmethod(rms_norm)  # `model/fusion.py` may set a compiled one on an instance

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)
