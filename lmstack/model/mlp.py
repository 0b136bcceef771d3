"""Feed-forward blocks: the GELU MLP of GPT-2 and the SwiGLU MLP of Llama-style models.

SwiGLU keeps gate and up projections in one fused matrix (`gate_up`, gate rows first) so a
forward is one matmul instead of two; `checkpoint/hf.py` splits it back into HF's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig


def activation_fn(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[name]


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation_fn(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def gated(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up from the fused projection's output (gate half first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return activation_fn(activation)(gate) * up


class SwiGLU(nn.Module):
    gated_fn = staticmethod(gated)  # `model/fusion.py` may set a compiled one on an instance

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up = nn.Linear(config.hidden_size, 2 * inter, bias=config.mlp_bias)
        self.down = nn.Linear(inter, config.hidden_size, bias=config.mlp_bias)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gated_fn(self.gate_up(x), self.activation))
