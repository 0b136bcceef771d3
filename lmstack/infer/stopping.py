"""Turn one sequence's new tokens into finished text: stop ids, stop strings, length limits.

Text comes from the tokenizer's `StreamDecoder` (complete UTF-8 only). A stop string can span
several tokens, so any tail of the text that could still be the start of a stop string is
held back until it is either completed (cut, finish "stop") or ruled out (emitted). The
streaming CLI, `generate` and the engine all use this one class, so they agree on the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from lmstack.infer.outputs import CompletionOutput
from lmstack.infer.params import SamplingParams


class SequenceState:
    """The growing output of one sample; `append(token)` returns the text it makes visible."""

    def __init__(self, index: int, params: SamplingParams, max_tokens: int, eos_token_ids: Sequence[int] = (),
                 tokenizer=None):
        self.params = params
        self.max_tokens = max_tokens
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_ids = set(params.stop_token_ids or [])
        self.stop_strings = params.stop_strings
        self.out = CompletionOutput(index=index, token_ids=[], text="" if tokenizer is not None else None)
        if params.logprobs is not None:
            self.out.logprobs, self.out.top_logprobs, self.out.cumulative_logprob = [], [], 0.0
        self._stream = None
        if tokenizer is not None:
            from lmstack.tokenizer.stream import StreamDecoder

            self._stream = StreamDecoder(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self._held = ""  # visible text not emitted yet: it may be the start of a stop string
        # per stop string: the longest tail of the text so far that is a proper prefix of it (KMP state),
        # advanced by each delta only, so a token costs O(len(delta)) per stop string, not O(len(held)^2)
        self._matchers = [_StopMatcher(s) for s in self.stop_strings] if self.stop_strings else []

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    def append(self, token: int, logprob: float | None = None, top: dict[int, float] | None = None) -> str:
        """Record a generated token; returns the new text (complete characters, never a stop string)."""
        out = self.out
        out.token_ids.append(token)
        if out.logprobs is not None and logprob is not None:
            out.logprobs.append(logprob)
            out.top_logprobs.append(top or {})
            out.cumulative_logprob += logprob
        stopped_by_id = token in self.stop_ids or token in self.eos
        if stopped_by_id and len(out.token_ids) > self.params.min_tokens - 1:
            out.finish_reason = "stop"
            out.stop_reason = token if token in self.stop_ids else None
            return self._finish_text()
        delta = self._stream.push(token) if self._stream is not None else ""
        emitted = self._scan(delta)
        if not self.finished and len(out.token_ids) >= self.max_tokens:
            out.finish_reason = "length"
            emitted += self._finish_text()
        return emitted

    def finish(self, reason: str = "length") -> str:
        """End the sequence from outside (context full, request aborted); returns held-back text."""
        if self.finished:
            return ""
        self.out.finish_reason = reason
        return self._finish_text()

    def _finish_text(self) -> str:
        rest = self._stream.flush() if self._stream is not None else ""
        if self.out.finish_reason == "length" and rest:
            return self._scan(rest, final=True)
        return self._emit(self._held + rest, held="")

    def _emit(self, text: str, held: str) -> str:
        self._held = held
        if self.out.text is not None:
            self.out.text += text
        return text

    def _scan(self, delta: str, final: bool = False) -> str:
        if not self.stop_strings:
            return self._emit(self._held + delta, held="")
        buffer = self._held + delta
        hits = [(buffer.find(s), s) for s in self.stop_strings if s in buffer]
        if hits:
            at, stop = min(hits)
            self.out.finish_reason, self.out.stop_reason = "stop", stop
            keep = buffer[: at + len(stop)] if self.params.include_stop_str_in_output else buffer[:at]
            return self._emit(keep, held="")
        if final:
            return self._emit(buffer, held="")
        hold = max((m.feed(delta) for m in self._matchers), default=0)
        return self._emit(buffer[: len(buffer) - hold], held=buffer[len(buffer) - hold:])


@lru_cache(maxsize=256)
def _prefix_function(stop: str) -> tuple[int, ...]:
    """KMP's prefix function: pi[i] is the length of the longest proper prefix of stop[:i + 1] that is
    also a suffix of it. O(len(stop))."""
    pi = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        c = stop[i]
        while k and stop[k] != c:
            k = pi[k - 1]
        if stop[k] == c:
            k += 1
        pi[i] = k
    return tuple(pi)


def _advance(stop: str, pi: Sequence[int], state: int, text: str) -> int:
    """KMP automaton: from `state` (a matched prefix length < len(stop)) over `text`; returns the length of
    the longest tail of what was read that is a proper prefix of `stop` (a full match falls back to its
    longest proper border). Amortized O(len(text)) over a sequence of calls."""
    last = len(stop)
    for c in text:
        while state and stop[state] != c:
            state = pi[state - 1]
        if stop[state] == c:
            state += 1
            if state == last:
                state = pi[state - 1]
    return state


class _StopMatcher:
    """The KMP state of one stop string over a growing text."""

    __slots__ = ("stop", "pi", "state")

    def __init__(self, stop: str):
        self.stop, self.pi, self.state = stop, _prefix_function(stop), 0

    def feed(self, text: str) -> int:
        if text:
            self.state = _advance(self.stop, self.pi, self.state, text)
        return self.state
