"""Compiled pointwise kernels inside an eager forward (the engine's CUDA-graph decode steps).

Eager PyTorch runs RMSNorm as about 7 kernels, RoPE on q and k as about 10 and the SwiGLU gate
as 2. A decode step of a 28-layer model is then well over a thousand tiny kernels, and each
costs a few microseconds even replayed from a CUDA graph, a large part of a step whose real
work (weights and KV reads) takes a few milliseconds. `fuse_pointwise(model)` gives each
RMSNorm, attention and SwiGLU module a `torch.compile`d version of its pointwise function (one
kernel each, shapes dynamic so every batch size shares one compilation), as nano-vllm does. It
changes the modules in place (the engine's `fuse_pointwise=True` does it to the model it is
given); `unfuse_pointwise` undoes it. The
matmuls and the attention are untouched and the forward stays eager, so the engine's own CUDA
graphs capture it as before. Training compiles the whole model instead and does not use this.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lmstack.model.attention import Attention
from lmstack.model.mlp import SwiGLU, gated
from lmstack.model.norms import RMSNorm, rms_norm
from lmstack.model.rope import apply_rope_qk


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` over per-head vectors (QK-norm): its own function so its 4-D shapes get their own
    compile cache instead of sharing the hidden-state norm's (torch caches per function)."""
    return rms_norm(x, weight, eps)


@functools.cache
def compiled(fn):
    """One compiled wrapper per function. Not fullgraph: should shapes, dtypes and grad modes ever
    pass torch's recompile limit, torch runs the function eagerly instead of failing."""
    return torch.compile(fn, dynamic=True)


def fuse_pointwise(model: nn.Module) -> int:
    """Switch, in place, every RMSNorm / attention RoPE / SwiGLU gate of `model` to its compiled
    kernel (compiled on first use); returns how many modules were switched."""
    head_norms = {id(m) for a in model.modules() if isinstance(a, Attention) for m in (a.q_norm, a.k_norm)
                  if m is not None}
    switched = 0
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.norm_fn = compiled(head_rms_norm if id(module) in head_norms else rms_norm)
        elif isinstance(module, Attention):
            module.rope_fn = compiled(apply_rope_qk)
        elif isinstance(module, SwiGLU):
            module.gated_fn = compiled(gated)
        else:
            continue
        switched += 1
    return switched


def unfuse_pointwise(model: nn.Module) -> None:
    """Back to the eager functions (the class defaults)."""
    for module in model.modules():
        for name in ("norm_fn", "rope_fn", "gated_fn"):
            module.__dict__.pop(name, None)
