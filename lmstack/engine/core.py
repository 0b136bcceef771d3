"""The engine's step: schedule, run one batched forward, sample, stop, report.

`EngineCore` is synchronous and single-threaded: `add_request`, `abort_request`, `step`.
`LLM` drives it in a loop for offline batches and `AsyncEngine` runs it on a background thread
for the server. Sampling, logprobs, stop conditions and detokenization are the ones of
`lmstack.infer` (one implementation for single-request and batched inference).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, fields

import torch

from lmstack.config import is_int
from lmstack.engine.kv_cache import BlockManager, PagedKVCache
from lmstack.engine.outputs import EngineStats, RequestOutput
from lmstack.engine.runner import ModelRunner, profile_peak_memory, resolve_backend, to_device
from lmstack.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lmstack.engine.sequence import PLACEHOLDER, Request, Sequence, SequenceStatus
from lmstack.errors import ConfigError, RequestError
from lmstack.infer.generate import as_token_lists, eos_ids_for
from lmstack.infer.outputs import CompletionOutput
from lmstack.infer.params import GenerationConfig, SamplingParams
from lmstack.infer.sampling import (
    SamplingTensors,
    TokenCounts,
    logprobs_of,
    make_generator,
    process_logits,
    sample,
)
from lmstack.infer.stopping import SequenceState
from lmstack.model.fusion import fuse_pointwise

KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass
class EngineConfig:
    """Engine options (vLLM's names where vLLM has them)."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV blocks in the pool; None: sized from memory (below)
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the GPU the engine may fill (weights + KV)
    cpu_kv_cache_gib: float = 1.0  # CPU: KV pool size when num_blocks is not given
    max_num_seqs: int = 256  # sequences running at once (the decode batch)
    max_num_batched_tokens: int = 8192  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"  # "auto" | "reference" (gather + SDPA) | "triton" (CUDA)
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (CUDA, triton backend, dense MLPs)
    async_scheduling: bool | None = None  # overlap the next step's scheduling with this one; None: on CUDA
    # compiled norm / RoPE / SwiGLU-gate kernels in the eager forward (model/fusion.py). Off by
    # default until measured on a GPU; it compiles on first use (seconds on CUDA, longer on CPU)
    fuse_pointwise: bool = False
    # "auto": the model's dtype; "fp8": float8_e4m3fn, half the bytes of bf16 per cached token (twice
    # the blocks in the same memory, half the attention reads), unscaled and clamped to +-448
    kv_cache_dtype: str = "auto"

    def validate(self) -> EngineConfig:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens")
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("num_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer or None")
        for name in ("gpu_memory_utilization", "cpu_kv_cache_gib"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} must be a finite number")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.cpu_kv_cache_gib <= 0:
            raise ConfigError(f"cpu_kv_cache_gib={self.cpu_kv_cache_gib} must be > 0 (GiB)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        return self

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs).validate()


@dataclass
class _Launched:
    """A step whose forward and sampling are queued on the device, not read back yet."""

    sample_seqs: list[Sequence]
    prompt: list  # (sequence, logprobs_of(...) of its prompt chunk), being copied to the host
    scored: list[Sequence] = field(default_factory=list)  # max_tokens=0: done once their prompt is read back
    tokens: torch.Tensor | None = None  # (len(sample_seqs),) sampled tokens, on the device (feeds the next step)
    positions: list[int] | None = None  # where each sampled token goes in its sequence's token_ids
    host_tokens: torch.Tensor | None = None  # the same tokens, being copied to the host
    logprobs: tuple | None = None  # logprobs_of(...) of the sampled tokens, being copied to the host
    copied: torch.cuda.Event | None = None  # recorded after the copies: wait on it, not on the stream

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()


def _to_host(tensors):
    """Start copying device results to (pinned) host memory; read them after `_Launched.wait`."""
    return tuple(t.to("cpu", non_blocking=True) if t is not None else None for t in tensors)


class EngineCore:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.config = config = (config or EngineConfig()).validate()
        self.model = model.eval()
        if config.fuse_pointwise:
            fuse_pointwise(model)  # before pool sizing and graph capture, which run the forward
        self.tokenizer = tokenizer
        self.device = model.device
        mc = model.config
        self.vocab_size = mc.vocab_size
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        num_blocks = config.num_blocks or self._blocks_from_memory()
        self.kv = PagedKVCache(mc, num_blocks, config.block_size, self.device, config.kv_dtype(model.dtype))
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            config.enable_chunked_prefill), self.blocks)
        self._check_kv_dtype(config)
        self.runner = ModelRunner(model, self.kv, backend=config.attention_backend, cuda_graphs=config.cuda_graphs,
                                  max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len)
        self.eos_token_ids = eos_ids_for(model, tokenizer, GenerationConfig())
        self.requests: dict[str, Request] = {}
        self._request_ids = itertools.count()
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._sampling_cache: tuple[tuple[int, ...], SamplingTensors] | None = None
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._inflight: _Launched | None = None  # launched, not read back yet (overlapped scheduling)
        self._num_sync_requests = 0  # active requests whose sampling needs every past token on the host
        self._counters = EngineStats(kv_blocks_total=num_blocks, block_size=config.block_size)

    def _check_kv_dtype(self, config: EngineConfig) -> None:
        """Triton converts fp8 (e4m3) in registers only on compute capability >= 8.9 (Ada, Hopper)."""
        if (self.kv.k.dtype.itemsize == 1 and self.device.type == "cuda"
                and resolve_backend(config.attention_backend, self.device) == "triton"
                and torch.cuda.get_device_capability(self.device) < (8, 9)):
            raise ConfigError(
                f"kv_cache_dtype={config.kv_cache_dtype!r} with the Triton attention kernel needs a GPU of compute "
                f"capability >= 8.9; this one is {torch.cuda.get_device_capability(self.device)}. Use "
                "kv_cache_dtype='auto', or attention_backend='reference' (slower)")

    # ---- memory -----------------------------------------------------------------------------
    def _blocks_from_memory(self) -> int:
        mc, cfg = self.model.config, self.config
        per_block = PagedKVCache.bytes_per_block(mc, cfg.block_size, cfg.kv_dtype(self.model.dtype))
        if self.device.type != "cuda":
            return max(1, int(cfg.cpu_kv_cache_gib * 2**30) // per_block)
        # nano-vllm's rule: what the budget leaves after the weights and the peak of one full step.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        profile_peak_memory(self.model, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        budget = total * cfg.gpu_memory_utilization - (total - free) - peak + current
        torch.cuda.empty_cache()
        if budget < per_block:
            raise ConfigError(
                f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves no room for the KV cache after the "
                f"weights and activations ({(total - free) / 2**30:.1f} GiB in use of {total / 2**30:.1f} GiB); "
                "raise it, lower max_num_batched_tokens, or pass num_blocks")
        return int(budget // per_block)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, stream: bool = False) -> Request:
        """Validate and queue one prompt (text or token ids); raises RequestError/ConfigError before any work."""
        return self.submit(self.make_request(prompt, params, request_id, priority, stream))

    def submit(self, request: Request) -> Request:
        """Queue a request made by `make_request`."""
        if request.request_id in self.requests:
            raise RequestError(f"request_id {request.request_id!r} is already in use; give each request a unique id")
        self.requests[request.request_id] = request
        self._num_sync_requests += request.needs_sync
        self._counters.prompt_tokens_total += len(request.prompt_token_ids)
        for seq in request.sequences:
            self.scheduler.add(seq)
        return request

    def make_request(self, prompt, params, request_id=None, priority=0, stream=False) -> Request:
        """Everything `add_request` checks, without queueing (thread-safe: reads config only)."""
        params = params if params is not None else SamplingParams()
        if isinstance(params, GenerationConfig) and params.num_beams > 1:
            raise ConfigError("num_beams > 1 (beam search) is not supported by the engine; "
                              "use lmstack.infer.generate for beam search")
        params.validate(self.vocab_size)
        is_empty = not isinstance(prompt, str) and len(prompt) == 0
        ids_list, texts = ([[]], [None]) if is_empty else as_token_lists(prompt, self.tokenizer)
        if len(ids_list) != 1:
            raise ConfigError(f"one prompt per request, got {len(ids_list)}")
        ids, text = ids_list[0], texts[0]
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        max_tokens = self._check_fits(ids, params)
        request = Request(request_id, text, ids, params, arrival_order=next(self._arrivals), priority=int(priority),
                          max_tokens=max_tokens, stream=stream)
        if request.wants_prompt_logprobs:  # the first token has none; a 1-token prompt gets exactly [None]
            request.prompt_logprobs = [None]
            request.prompt_top_logprobs = [None] if params.prompt_logprobs else None
        # Penalties and min_tokens read every generated token on the host before sampling.
        request.needs_sync = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                              or params.frequency_penalty != 0.0 or params.min_tokens > 0)
        for j in range(params.n):
            p = params if params.seed is None else params.replace(seed=params.seed + j, n=1)
            state = SequenceState(j, p, max_tokens, self.eos_token_ids, self.tokenizer)
            seq = Sequence(next(self._seq_ids), request, j, list(ids), len(ids), state=state,
                           generator=make_generator(p.seed, self.device), params=p)
            request.sequences.append(seq)
        return request

    def _check_fits(self, ids: list[int], params: SamplingParams) -> int:
        """The request's max_tokens; RequestError if it can never be served."""
        n, limit = len(ids), self.max_model_len
        if n == 0:
            raise RequestError("the prompt is empty; give at least one token (e.g. the BOS token)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        room = limit - n
        if room < 0 or (room == 0 and params.max_tokens != 0):
            raise RequestError(f"the prompt has {n} tokens but max_model_len is {limit}: nothing can be generated; "
                               "shorten the prompt" + (" (max_tokens=0 scores a prompt of up to max_model_len tokens)"
                                                       if room == 0 else ""))
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds max_model_len={limit}; "
                               f"use max_tokens <= {room}")
        # the KV cache holds every token but the last generated one (max_tokens=0: the whole prompt)
        need = self.blocks.blocks_for(n + max(max_tokens - 1, 0))
        if need > self.blocks.num_blocks:
            raise RequestError(
                f"the request needs up to {need} KV blocks ({n} prompt + {max_tokens} new tokens, block_size="
                f"{self.blocks.block_size}) but the pool has {self.blocks.num_blocks}; lower max_tokens or give the "
                "engine more KV memory (num_blocks / gpu_memory_utilization)")
        if not self.config.enable_chunked_prefill and n > self.config.max_num_batched_tokens:
            raise RequestError(f"the prompt has {n} tokens, more than max_num_batched_tokens="
                               f"{self.config.max_num_batched_tokens}, and chunked prefill is off; shorten the prompt, "
                               "raise max_num_batched_tokens or set enable_chunked_prefill=True")
        return max_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        for seq in request.sequences:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.state.finish("abort")
                self._mark_finished(seq)
        self._drop(request)
        return self._output(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one forward; returns outputs of finished requests and of streaming ones that advanced.

        With async scheduling the step launched here is read back by the next call, after that
        call has launched its own step (fed by this one's tokens, still on the device): the host
        then does its bookkeeping while the device computes, as vLLM's async scheduling does.
        """
        outputs = []
        if self._inflight is not None and not self._overlap():
            outputs += self._finish(self._inflight)
            self._inflight = None
        launched = self._launch()
        if self._inflight is not None:  # the previous step, read back while `launched` runs
            outputs += self._finish(self._inflight)
        self._inflight = launched
        if launched is not None and not self._overlap():
            outputs += self._finish(launched)
            self._inflight = None
        return outputs

    def _overlap(self) -> bool:
        return self.async_scheduling and self._num_sync_requests == 0

    def _launch(self) -> _Launched | None:
        """Schedule, run the forward and sample, without reading anything back from the device."""
        out = self.scheduler.schedule()
        if out.is_empty:
            if self.requests and self._inflight is None:  # cannot happen for validated requests
                raise RuntimeError(f"the scheduler made no progress with {len(self.requests)} requests queued")
            return None
        keep, sample_seqs, prompt_rows, scored = self._rows(out)
        logits = self.runner.run(out.scheduled, keep, self._fed_tokens(out))
        self.scheduler.update(out)
        self._counters.num_steps_total += 1
        self._counters.computed_tokens_total += out.num_tokens
        prompt = []
        for seq, rows, targets in prompt_rows:
            tokens = to_device(targets, torch.long, logits.device)
            prompt.append((seq, _to_host(logprobs_of(logits[rows], tokens, seq.request.params.prompt_logprobs))))
        launched = _Launched(sample_seqs, prompt, scored)
        for seq in scored:  # max_tokens=0: the prompt is all there is to compute
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHING
        if sample_seqs:
            logits = logits[len(keep) - len(sample_seqs):]
            tensors = self._sampling_tensors(sample_seqs)
            counts = None
            if tensors.do_repetition or tensors.do_presence_frequency or tensors.stop_ids is not None:
                counts = self._token_counts(sample_seqs)
            launched.tokens = sample(process_logits(logits, tensors, counts), tensors)
            top_k = max((seq.params.logprobs for seq in sample_seqs if seq.params.logprobs is not None), default=None)
            (launched.host_tokens,) = _to_host([launched.tokens])
            if top_k is not None:
                launched.logprobs = _to_host(logprobs_of(logits, launched.tokens, top_k))
            launched.positions = [len(seq.token_ids) for seq in sample_seqs]
            for i, seq in enumerate(sample_seqs):
                seq.pending_row, seq.pending_pos = i, len(seq.token_ids)  # for the next launch to feed it
                seq.token_ids.append(PLACEHOLDER)  # known once read back; the next step may already use it
                if seq.num_output_tokens >= seq.request.max_tokens:
                    self.scheduler.remove(seq)  # it finishes by length whatever the token: nothing more to run
                    seq.status = SequenceStatus.FINISHING
        if self.device.type == "cuda":  # the next step's kernels queue behind this event, not before it
            launched.copied = torch.cuda.Event()
            launched.copied.record()
        return launched

    def _fed_tokens(self, out: SchedulerOutput):
        """Decode inputs that are tokens of the in-flight step: (flat rows, device tokens, their rows)."""
        if self._inflight is None or self._inflight.tokens is None:
            return None
        rows, sources, offset = [], [], 0
        for s in out.scheduled:
            if s.num_tokens == 1 and s.seq.token_ids[s.start] == PLACEHOLDER:
                assert s.start == s.seq.pending_pos, "a placeholder token from an older step"
                rows.append(offset)
                sources.append(s.seq.pending_row)
            offset += s.num_tokens
        return (rows, self._inflight.tokens, sources) if rows else None

    def _finish(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step back: prompt logprobs, new tokens, stop checks, outputs."""
        launched.wait()
        touched: dict[str, Request] = {}
        for seq, (chosen, top_vals, top_ids) in launched.prompt:
            request = seq.request
            if request.request_id not in self.requests:
                continue  # aborted meanwhile
            request.prompt_logprobs.extend(chosen.tolist())
            if top_ids is not None:
                request.prompt_top_logprobs.extend(dict(zip(i, v)) for i, v in zip(top_ids.tolist(),
                                                                                     top_vals.tolist()))
        for seq in launched.scored:
            if not seq.is_finished:  # else aborted meanwhile
                seq.state.finish("length")
                self._mark_finished(seq)
                touched[seq.request.request_id] = seq.request
        if launched.tokens is not None:
            self._append_tokens(launched, touched)
        outputs = []
        for request in touched.values():
            if request.is_finished:
                self._drop(request)
                outputs.append(self._output(request))
            elif request.stream:
                outputs.append(self._output(request))
        return outputs

    def _rows(self, out: SchedulerOutput):
        """Which logits rows to compute: prompt-logprob rows first, then one row per sampled sequence
        (none for a max_tokens=0 request, which is `scored` once its prompt is in)."""
        prompt_keep, sample_keep, sample_seqs, prompt_rows, scored = [], [], [], [], []
        offset = 0
        for s in out.scheduled:
            seq, request = s.seq, s.seq.request
            if request.wants_prompt_logprobs and seq.index == 0:
                done = request.num_scored_prompt_tokens  # scored or being scored (the first token counts)
                lo, hi = max(s.start, done - 1), min(s.end, seq.num_prompt_tokens - 1)
                if lo < hi:  # positions lo..hi-1 predict prompt tokens lo+1..hi
                    first = len(prompt_keep)
                    prompt_keep.extend(range(offset + lo - s.start, offset + hi - s.start))
                    prompt_rows.append((seq, slice(first, len(prompt_keep)), seq.token_ids[lo + 1:hi + 1]))
                    request.num_scored_prompt_tokens = hi + 1
            if s.completes and request.max_tokens == 0:
                scored.append(seq)
            elif s.completes:
                sample_keep.append(offset + s.num_tokens - 1)
                sample_seqs.append(seq)
            offset += s.num_tokens
        return prompt_keep + sample_keep, sample_seqs, prompt_rows, scored

    def _sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        """Per-row sampling options; rebuilt only when the batch's members change (steady decode reuses them)."""
        key = tuple(seq.seq_id for seq in seqs)
        cached = self._sampling_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None and set(key) <= set(cached[0]):  # some finished: keep the others' rows
            row = {seq_id: i for i, seq_id in enumerate(cached[0])}
            rows = [row[seq_id] for seq_id in key]
            tensors = cached[1].select(rows, params=[seq.params for seq in seqs],
                                       index=to_device(rows, torch.long, self.device))
        else:
            tensors = SamplingTensors.from_params([seq.params for seq in seqs], self.vocab_size, self.device,
                                                  self.eos_token_ids, generators=[seq.generator for seq in seqs])
        self._sampling_cache = (key, tensors)
        return tensors

    def _token_counts(self, seqs: list[Sequence]) -> TokenCounts:
        counts = TokenCounts.from_prompts([seq.token_ids[: seq.num_prompt_tokens] for seq in seqs],
                                          self.vocab_size, self.device)
        for i, seq in enumerate(seqs):
            out = seq.output_token_ids
            if out and out[-1] == PLACEHOLDER:  # a token still on the device: this step must not overlap
                raise RuntimeError(f"sequence {seq.seq_id} needs token counts while its last token is in flight")
            if out:
                ids = torch.tensor(out, device=self.device)
                counts.output_counts[i].scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
                counts.num_generated[i] = len(out)
        return counts

    def _append_tokens(self, launched: _Launched, touched: dict[str, Request]) -> None:
        tokens = launched.host_tokens.tolist()
        chosen = top = None
        if launched.logprobs is not None:
            lp, top_vals, top_ids = launched.logprobs
            chosen = lp.tolist()
            if top_ids is not None:
                top = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_vals.tolist())]
        now = time.time()
        for i, (seq, token, position) in enumerate(zip(launched.sample_seqs, tokens, launched.positions)):
            if seq.is_finished:
                continue  # aborted, or stopped by the token of the step before (this one ran in vain)
            request = seq.request
            seq.token_ids[position] = token
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                seq.state.append(token, chosen[i], dict(top[i][:k]) if top is not None and k else {})
            else:
                seq.state.append(token)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            request.metrics.last_token_time = now
            self._counters.generation_tokens_total += 1
            if seq.state.finished:
                self.scheduler.remove(seq)
                self._mark_finished(seq)
            touched[request.request_id] = request

    def _mark_finished(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq.token_ids[-1] == PLACEHOLDER:  # a decode was already launched for it: drop its input
            seq.token_ids.pop()

    def _drop(self, request: Request) -> None:
        """A request is done (finished or aborted): forget it and count it."""
        self.requests.pop(request.request_id, None)
        self._num_sync_requests -= request.needs_sync
        self._finished(request)

    # ---- outputs -----------------------------------------------------------------------------
    def _finished(self, request: Request) -> None:
        request.metrics.finished_time = time.time()
        reasons = self._counters.requests_finished_total
        for seq in request.sequences:
            reason = seq.state.out.finish_reason or "abort"
            reasons[reason] = reasons.get(reason, 0) + 1

    def _output(self, request: Request) -> RequestOutput:
        """The request's outputs: cumulative when not streaming, else only what is new since the last call."""
        finished = request.is_finished
        if request.stream:
            completions = [_delta(seq) for seq in request.sequences]
        else:
            completions = [seq.state.out for seq in request.sequences]
        return RequestOutput(
            prompt_token_ids=request.prompt_token_ids, outputs=completions, prompt=request.prompt,
            prompt_logprobs=request.prompt_logprobs, prompt_top_logprobs=request.prompt_top_logprobs,
            request_id=request.request_id, finished=finished,
            # sample 0's: later samples reuse the prompt blocks sample 0 computed, not an earlier request's
            num_cached_tokens=request.sequences[0].num_cached_tokens if request.sequences else 0,
            metrics=request.metrics,
        )

    def stats(self) -> EngineStats:
        c = self._counters
        s = EngineStats(**{f.name: getattr(c, f.name) for f in fields(EngineStats)})
        s.requests_finished_total = dict(c.requests_finished_total)
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_blocks_used = self.blocks.num_used_blocks
        s.num_preemptions_total = self.scheduler.num_preemptions
        s.prefix_cache_queries_total = self.scheduler.prefix_cache_queries
        s.prefix_cache_hits_total = self.scheduler.prefix_cache_hits
        return s


def _delta(seq: Sequence) -> CompletionOutput:
    """What `seq` produced since its last streamed output (tokens, text, logprobs)."""
    out = seq.state.out
    t0, c0 = seq.num_emitted_tokens, seq.num_emitted_chars
    seq.num_emitted_tokens, seq.num_emitted_chars = len(out.token_ids), len(out.text or "")
    return CompletionOutput(
        index=out.index, token_ids=out.token_ids[t0:], text=(out.text or "")[c0:] if out.text is not None else None,
        finish_reason=out.finish_reason, stop_reason=out.stop_reason,
        logprobs=out.logprobs[t0:] if out.logprobs is not None else None,
        top_logprobs=out.top_logprobs[t0:] if out.top_logprobs is not None else None,
        cumulative_logprob=out.cumulative_logprob,
    )
