"""Request and sequence state: what the scheduler, block manager and runner share.

A `Request` is what a user submitted (one prompt, its sampling options, n samples); each of
its n samples is a `Sequence`, which the scheduler treats on its own. A sequence's progress is
one number, `num_computed_tokens` (tokens whose keys and values are in the cache): prefill,
chunked prefill, decode and recompute after preemption are all "compute the tokens up to
`num_tokens`", as in vLLM v1.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

PLACEHOLDER = -1  # a sampled token still on the device (async scheduling); never fed to the model


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHING = "finishing"  # its last token is computed but not read back yet; it holds no blocks
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) the server turns into queue, TTFT and latency histograms."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(eq=False)
class Sequence:
    """One sample of a request: its tokens, its blocks and how far its KV has been computed."""

    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt + generated tokens
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks, chained (prefix caching)
    num_registered_blocks: int = 0  # leading blocks already published to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False  # scheduled at least once (first admissions feed the prefix-cache stats)
    num_preemptions: int = 0
    state: Any = None  # lmstack.infer.stopping.SequenceState: output tokens, text, logprobs, finish
    params: Any = None  # this sample's SamplingParams (sample j of a seeded request uses seed + j)
    generator: Any = None  # torch.Generator of a seeded sample
    # what the last streamed output reported, so the next one carries only what is new
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    # where the token sampled by the in-flight step goes (row in its tokens, position in token_ids)
    pending_row: int = 0
    pending_pos: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens before the trailing placeholders (at most two: read back one step late)."""
        n = len(self.token_ids)
        while n and self.token_ids[n - 1] == PLACEHOLDER:
            n -= 1
        return n

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Scheduling order: lower priority value first, then arrival, then sample index."""
        return (self.request.priority, self.request.arrival_order, self.index)


@dataclass(eq=False)
class Request:
    """A submitted prompt with its options; its n samples are `sequences`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    arrival_order: int
    priority: int = 0
    max_tokens: int = 16  # resolved: never None, never past the context
    stream: bool = False
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # filled chunk by chunk (sample 0 computes them)
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    num_scored_prompt_tokens: int = 1  # prompt tokens whose logprob is known or being computed
    needs_sync: bool = False  # its sampling reads all past tokens on the host (no overlapped scheduling)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

