"""What generation returns, with vLLM's names: one `RequestOutput` per prompt, one
`CompletionOutput` per sample (or beam) of it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int  # which of the prompt's n samples (or beams, best first)
    token_ids: list[int]  # generated tokens, including a final EOS / stop token or stop-string tokens
    text: str | None = None  # decoded text, cut before a stop string; None without a tokenizer
    finish_reason: str | None = None  # "stop" (EOS, stop id or stop string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (None for EOS)
    logprobs: list[float] | None = None  # the model's log-probability of each generated token
    top_logprobs: list[dict[int, float]] | None = None  # the k most likely tokens at each step
    cumulative_logprob: float | None = None  # sum of logprobs (sampling) or beam score (beam search)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt: str | None = None
    prompt_logprobs: list[float | None] | None = None  # first token has none (vLLM's convention)
