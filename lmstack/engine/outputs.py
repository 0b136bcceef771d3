"""What the engine gives back: per-request outputs (vLLM's shapes) and a stats snapshot.

`RequestOutput` extends the one of `lmstack.infer` (request_id, finished, metrics), so code
written against `vllm.LLM` reads the same. `EngineStats` holds the gauges and counters the
server exports as Prometheus metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.engine.sequence import RequestMetrics
from lmstack.infer.outputs import CompletionOutput
from lmstack.infer.outputs import RequestOutput as _InferRequestOutput

__all__ = ["CompletionOutput", "EngineStats", "RequestOutput"]


@dataclass
class RequestOutput(_InferRequestOutput):
    """`lmstack.infer.RequestOutput` plus what a served request has: its id, whether it is done,
    the top-k alternatives of each prompt token (prompt_logprobs=k), prefix-cache hits and times.

    In a streamed output each `CompletionOutput` holds only what is new since the previous one.
    """

    request_id: str = ""
    finished: bool = False
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine's state; counters (`*_total`) only grow."""

    num_running: int = 0  # sequences being computed
    num_waiting: int = 0  # sequences queued (new or preempted)
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    block_size: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # prompt tokens found there (not recomputed)
    prompt_tokens_total: int = 0  # prompt tokens of admitted requests
    generation_tokens_total: int = 0
    computed_tokens_total: int = 0  # tokens run through the model (prefill + decode + recompute)
    num_steps_total: int = 0
    requests_finished_total: dict[str, int] = field(default_factory=dict)  # samples, by finish reason

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queries_total
        return self.prefix_cache_hits_total / q if q else 0.0
