"""CPU decoding with oneDNN-packed linear weights: the same math, read at full memory speed.

Decoding one token is a chain of matrix-vector products, so its speed is the rate at which the
weights stream from memory. On CPUs, PyTorch's default fp32 GEMV on an (out, in) weight reaches
about half the memory bandwidth (16-17 GB/s on this project's 2-core machine, against 30 GB/s
for a plain read); the same product on a weight reordered once into oneDNN's blocked layout
reaches 24-32 GB/s (measured in `benchmarks/bench_decode.py`'s notes). We pack a *copy* for
decoding: the model the user holds (and trains) keeps plain weights; the copy shares every
other tensor. Results equal `F.linear` to fp32 rounding (tests compare in float64).

Packing GPT-2 124M takes about 0.2 s, as long as decoding 8 tokens, so the packed copy is kept
per model (while the model lives) and made again only when a tensor of the model changed: an
optimizer step, `load_state_dict` or a swapped module all change the signature it is kept under.
Writes through `.data` bump no version counter and go unseen: call `forget(model)` after them.

One case is faster still outside oneDNN: a batch-1 decode step, where every product is a GEMV.
Each oneDNN call costs 25-45 us before it streams anything, and PyTorch's own GEMV runs on one
core (17 GB/s), while numpy's BLAS (OpenBLAS in numpy's wheels) streams a GEMV with its own
threads at 32-37 GB/s for every GPT-2 shape. Two thread pools that both spin-wait must not take
turns, though (both at 2 threads: 4x slower), so such a step runs PyTorch's few small ops on one
thread and gives the cores to BLAS (`blas_decode_step`); measured +12-17% decode tokens/s for
GPT-2 124M on the 2-core CI machine (benchmarks/RESULTS.md). It is used only where it pays: one
row, a multi-threaded BLAS (threadpoolctl tells), and a KV cache small beside the weights, since
attention over a long cache would then run on one core.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import os
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Packing holds a second copy of the linear weights; beyond this many bytes the memory matters
# more than the speed, and decoding uses the model as it is (LMSTACK_CPU_PACK_MAX_BYTES overrides it).
MAX_PACKED_BYTES = 4 * 2**30


def max_packed_bytes() -> int:
    """LMSTACK_CPU_PACK_MAX_BYTES (bytes, or a size like 2GB / 512MiB), read at each call; else MAX_PACKED_BYTES."""
    from lmstack.checkpoint.files import parse_size
    from lmstack.errors import CheckpointError, ConfigError

    raw = os.environ.get("LMSTACK_CPU_PACK_MAX_BYTES")
    if raw is None:
        return MAX_PACKED_BYTES
    try:
        return parse_size(raw)
    except CheckpointError:
        raise ConfigError(f"LMSTACK_CPU_PACK_MAX_BYTES={raw!r} is not a size: give bytes (4294967296) or a size "
                          "like 4GB or 512MiB") from None


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight reordered for oneDNN (inference only: no gradient)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_size=1)
        self.bias = linear.bias.detach() if linear.bias is not None else None  # shared storage
        # numpy views of the model's own tensors (no copy) for blas_decode_step's GEMVs
        self.np_weight = linear.weight.detach().numpy()
        self.np_bias = self.bias.numpy() if self.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] == 1 and _blas_step.active:
            y = self.np_weight @ flat[0].detach().numpy()
            if self.np_bias is not None:
                y += self.np_bias
            return torch.from_numpy(y).reshape(*x.shape[:-1], self.out_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def can_pack(model: nn.Module) -> bool:
    """fp32 plain weights on a CPU with oneDNN, not too large to hold twice."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if not linears or os.environ.get("LMSTACK_CPU_PACK", "1") == "0":
        return False
    weights = [m.weight for m in linears]
    if any(type(w) not in (torch.Tensor, nn.Parameter) or w.device.type != "cpu" or w.dtype != torch.float32
           for w in weights):
        return False  # quantized (torchao) or non-fp32 weights keep their own kernels
    return linear_weight_bytes(model) <= max_packed_bytes()


def linear_weight_bytes(model: nn.Module) -> int:
    """fp32 bytes of the plain Linear weights, a tied one counted once: what a decode step reads."""
    weights = {id(m.weight): m.weight for m in model.modules() if type(m) is nn.Linear}
    return sum(w.numel() * 4 for w in weights.values())


class _BlasStep(threading.local):
    active = False


_blas_step = _BlasStep()

# a decode step goes to BLAS only while its KV cache is this much smaller than the weights
KV_TO_WEIGHT_BYTES = 1 / 8


@functools.cache
def _thread_pools() -> tuple[int, Any]:
    """(threads numpy's BLAS runs with, 0 if threadpoolctl knows none; torch's OpenMP runtime, a
    ctypes library, or None when torch's CPU threads are not OpenMP's)."""
    import numpy  # noqa: F401  (loads the BLAS library threadpoolctl then finds)
    from threadpoolctl import threadpool_info

    pools = threadpool_info()
    blas = max((p["num_threads"] for p in pools if p["user_api"] == "blas"), default=0)
    omp = [p["filepath"] for p in pools if p["user_api"] == "openmp"]
    omp = [f for f in omp if "torch" in Path(f).parts] or omp  # torch's own runtime, else the only one
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info() or len(omp) != 1:
        return blas, None
    return blas, ctypes.CDLL(omp[0])


def blas_threads() -> int:
    return _thread_pools()[0]


def blas_decode_pays(model: nn.Module, batch_size: int, cache_length: int) -> bool:
    """A batch-1 step whose KV cache is small beside the weights, with BLAS exactly as parallel
    as torch (fewer BLAS threads stream slower; more would use cores the user kept from torch)."""
    if batch_size != 1 or os.environ.get("LMSTACK_CPU_BLAS_GEMV", "1") == "0":
        return False
    threads = torch.get_num_threads()
    if threads < 2 or blas_threads() != threads or _thread_pools()[1] is None:
        return False
    c = model.config
    kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * cache_length * 4
    return kv_bytes <= KV_TO_WEIGHT_BYTES * model.packed_weight_bytes


@contextmanager
def blas_decode_step():
    """GEMVs through numpy's BLAS, everything else on one OpenMP thread (see the module doc).

    Only this OS thread's OpenMP team size changes (`omp_set_num_threads` is per thread), never
    torch's process-wide default: `torch.set_num_threads` here would leave threads that start
    meanwhile, or steps running in other Python threads, with the wrong count."""
    omp = _thread_pools()[1]
    threads = torch.get_num_threads()  # also runs torch's per-thread lazy setup before we change it
    omp.omp_set_num_threads(1)
    _blas_step.active = True
    try:
        yield
    finally:
        _blas_step.active = False
        omp.omp_set_num_threads(threads)


def forget(model: nn.Module) -> None:
    """Drop the packed copy kept for `model`: needed only after writing weights through `.data`,
    which (unlike in-place ops, optimizers and `load_state_dict`) no version counter sees."""
    _packed_views.pop(model, None)


_packed_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    """Which tensors the model holds and how often each was written in place (`_version`)."""
    return tuple((name, id(t), t.data_ptr(), t._version)
                 for name, t in [*model.named_parameters(), *model.named_buffers()])


def packed_view(model: nn.Module) -> nn.Module:
    """The packed copy of `model` for decoding, made once and reused while its tensors are unchanged."""
    kept = _packed_views.get(model)
    signature = _signature(model)
    if kept is None or kept[0] != signature:
        _packed_views.pop(model, None)  # free the stale copy before packing a new one
        _packed_views[model] = kept = (signature, packed_for_cpu_decoding(model))
    return kept[1]


def packed_for_cpu_decoding(model: nn.Module) -> nn.Module:
    """A copy of `model` whose linears are PackedLinear; every other tensor is shared, not copied."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    view = copy.deepcopy(model, memo)
    view.packed_weight_bytes = linear_weight_bytes(view)  # before the swap: PackedLinear is no nn.Linear
    for module in list(view.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
    return view.eval()
