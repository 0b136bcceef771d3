"""Run a model's prefill and decode steps for generation: the plain path and the compiled one.

`Decoder` (eager) uses the model's contiguous `KVCache`: simple, and what CPU runs.
`CompiledDecoder` uses a `StaticKVCache` and, gpt-fast style, compiles the one-token decode
step with `torch.compile(mode="reduce-overhead")` (a CUDA graph replayed every token) and the
prefill for a few padded length buckets. Both expose the same four calls, so `generate`, beam
search and speculative decoding share one loop whichever runs underneath; keep one
`CompiledDecoder` per model and reuse it, since its graphs belong to its cache.
"""

from __future__ import annotations

import weakref

import torch

from lmstack.model.cache import KVCache
from lmstack.model.transformer import Transformer


def default_compile(device: torch.device) -> bool:
    """Compiled decoding is opt-in by device: CUDA yes, CPU stays eager."""
    return device.type == "cuda"


class Decoder:
    """Eager decoding over the model's `KVCache`."""

    compiled = False

    def __init__(self, model: Transformer):
        self.model = model
        self.cache: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def start(self, batch_size: int, max_length: int) -> None:
        """A fresh cache for a batch that will hold at most max_length tokens per row."""
        self.cache = KVCache(self.model.config, batch_size, max_length, self.device, self.model.dtype)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) left-padded prompts -> logits of their last position (B, V)."""
        return self.model(input_ids, attention_mask=attention_mask, kv_cache=self.cache, logits_to_keep=1).logits[:, -1]

    def extend(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed T more tokens per row (speculative verification) -> logits of all of them (B, T, V)."""
        return self.model(input_ids, kv_cache=self.cache).logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> next-token logits (B, V)."""
        return self.model(tokens[:, None], kv_cache=self.cache).logits[:, -1]

    @property
    def length(self) -> int:
        return self.cache.length

    def crop(self, length: int) -> None:
        self.cache.crop(length)

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)


class PackedDecoder(Decoder):
    """Eager decoding over a CPU copy with oneDNN-packed weights (`cpu_packing`): batch-1 steps
    with a short cache run their GEMVs through BLAS, the rest as `Decoder` does."""

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        from lmstack.infer.cpu_packing import blas_decode_pays, blas_decode_step

        if not blas_decode_pays(self.model, tokens.shape[0], self.cache.length + 1):
            return super().decode(tokens)
        with blas_decode_step():
            return super().decode(tokens)


CACHE_STEP = 256  # static caches are sized in multiples of this (fewer distinct shapes, fewer graphs)


def _bucket(length: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return length


class CompiledDecoder(Decoder):
    """Static cache + CUDA-graph decode step + bucketed compiled prefill (eager when compile=False).

    compile=False runs the very same static-cache code without torch.compile, which is what the
    CPU tests compare against the plain `Decoder`, and the CUDA tests against the compiled path.
    """

    def __init__(self, model: Transformer, compile: bool = True,
                 prefill_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048), tune: bool = True):
        """tune: inductor's coordinate-descent kernel tuning (gpt-fast's setting): faster decode
        kernels for a longer first compile; it is a process-wide inductor setting once on."""
        super().__init__(model)
        from lmstack.infer.static_cache import StaticKVCache

        self._cache_cls = StaticKVCache
        self.compiled = compile
        self.prefill_buckets = prefill_buckets
        self.static: StaticKVCache | None = None
        self._length = 0
        self._decode_fn, self._prefill_fn = self._decode_step, self._prefill_step
        if compile:
            import torch._dynamo
            import torch._inductor.config as inductor_config

            if tune:
                inductor_config.coordinate_descent_tuning = True
            inductor_config.triton.unique_kernel_names = True
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # MoE routing has data-dependent shapes: it runs between graphs (a graph break) there
            fullgraph = model.config.mlp != "moe"
            self._decode_fn = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=fullgraph)
            self._prefill_fn = torch.compile(self._prefill_step, dynamic=False)

    # the traced functions: tensors in, tensors out, all cache updates in place
    def _decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.static.next_positions()[:, None]
        ctx = self.static.context(positions)
        return self.model(tokens[:, None], positions=positions, kv_cache=ctx).logits[:, -1].float()

    def _prefill_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        ctx = self.static.context(positions, attention_mask)
        logits = self.model(input_ids, positions=positions, attention_mask=attention_mask, kv_cache=ctx).logits
        return logits.index_select(1, last).squeeze(1).float()

    def start(self, batch_size: int, max_length: int) -> None:
        static = self.static
        if static is None or static.batch_size != batch_size or static.max_length < max_length:
            # a new shape means new graphs; reuse the cache (and graphs) whenever it is big enough,
            # and size it in steps of CACHE_STEP so requests of similar lengths share one shape
            size = max(max_length, static.max_length if static is not None else 0)
            size = min(-(-size // CACHE_STEP) * CACHE_STEP, max(size, self.model.config.max_position_embeddings))
            self.static = self._cache_cls(self.model.config, batch_size, size, self.device, self.model.dtype)
        else:
            self.static.reset()
        self.cache = self.static
        self._length = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        padded = min(_bucket(T, self.prefill_buckets), self.static.max_length - self._length)
        if padded > T:  # right-pad to the bucket; the padding slots are masked and then reused
            input_ids = torch.nn.functional.pad(input_ids, (0, padded - T))
            attention_mask = torch.nn.functional.pad(attention_mask, (0, padded - T))
        last = torch.tensor([T - 1], device=input_ids.device)
        logits = self._prefill_fn(input_ids, attention_mask, last)
        if padded > T:
            self.static.crop(self._length + T)
        self._length += T
        return logits

    def extend(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.static.next_positions()[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)
        ctx = self.static.context(positions)
        self._length += input_ids.shape[1]
        return self.model(input_ids, positions=positions, kv_cache=ctx).logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        self._length += 1
        return self._decode_fn(tokens)

    @property
    def length(self) -> int:
        return self._length

    def crop(self, length: int) -> None:
        self.static.crop(length)
        self._length = length


_compiled_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_decoder(model: Transformer, compile: bool | None = None) -> Decoder:
    """The compiled static-cache decoder on CUDA; on a CPU the eager one, over oneDNN-packed
    weights when the model is fp32 and small enough to hold them twice (`PackedDecoder`; see
    cpu_packing; the packed copy is kept per model too, and made again after the weights change).

    The compiled decoder is kept per model (while the model lives) and handed out again: a new
    one would compile and record its CUDA graphs again, tens of seconds per `generate` call."""
    if compile is None:
        compile = default_compile(model.device)
    if compile:
        if model not in _compiled_decoders:
            _compiled_decoders[model] = CompiledDecoder(model, compile=True)
        return _compiled_decoders[model]
    if model.device.type == "cpu":
        from lmstack.infer.cpu_packing import can_pack, packed_view

        if can_pack(model):
            return PackedDecoder(packed_view(model))
    return Decoder(model)
