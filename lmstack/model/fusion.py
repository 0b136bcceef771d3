"""Compiled pointwise kernels inside an eager forward (the engine's CUDA-graph decode steps).

Eager PyTorch runs RMSNorm as about 7 kernels, RoPE on q and k as about 10 and the SwiGLU gate
as 2. A decode step of a 28-layer model is then well over a thousand tiny kernels, and each
costs a few microseconds even replayed from a CUDA graph, a large part of a step whose real
work (weights and KV reads) takes a few milliseconds. `fuse_pointwise(model)` gives each
RMSNorm, attention and SwiGLU module a `torch.compile`d version of its pointwise function (one
kernel each, shapes dynamic so every batch size shares one compilation), as nano-vllm does. The
matmuls and the attention are untouched and the forward stays eager, so the engine's own CUDA
graphs capture it as before. Training compiles the whole model instead and does not use this.
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.model.attention import Attention
from lmstack.model.mlp import SwiGLU, gated
from lmstack.model.norms import RMSNorm, rms_norm
from lmstack.model.rope import apply_rope_qk

# module type -> (instance attribute, eager function); the compiled versions are made once per process
POINTWISE = {RMSNorm: ("norm_fn", rms_norm), Attention: ("rope_fn", apply_rope_qk), SwiGLU: ("gated_fn", gated)}
_compiled: dict = {}


def _compiled_version(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]


def fuse_pointwise(model: nn.Module) -> int:
    """Switch every RMSNorm / attention RoPE / SwiGLU gate of `model` to its compiled kernel
    (compiled on first use); returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        entry = POINTWISE.get(type(module))
        if entry is not None:
            setattr(module, entry[0], _compiled_version(entry[1]))
            switched += 1
    return switched


def unfuse_pointwise(model: nn.Module) -> None:
    """Back to the eager functions (the class defaults)."""
    for module in model.modules():
        entry = POINTWISE.get(type(module))
        if entry is not None:
            module.__dict__.pop(entry[0], None)
