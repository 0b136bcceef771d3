"""Sampling and generation options: one dataclass shared by `infer.generate` and the engine.

`SamplingParams` uses vLLM's names (n, temperature, top_p, top_k, min_p, penalties,
max_tokens, min_tokens, stop, stop_token_ids, ignore_eos, logprobs, prompt_logprobs, seed)
so requests look the same offline, in the engine and over HTTP. `GenerationConfig` adds what
only single-request generation has (beam search, transformers' `max_new_tokens` spelling).
Every check runs in `validate`, before any model work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmstack.config import is_int
from lmstack.errors import ConfigError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Per-request decoding options (vLLM's names and defaults where vLLM has them).

    temperature 0 means greedy. top_k 0 or -1 and top_p 1 disable those filters. Penalties follow
    vLLM/OpenAI: presence/frequency count *generated* tokens only, repetition (transformers' rule)
    counts prompt and generated tokens. min_tokens suppresses EOS and stop_token_ids until that
    many tokens were generated. A request with a seed samples from its own generator, so its
    output does not depend on what else shares the batch. max_tokens None fills the context;
    max_tokens 0 (the engine only) scores the prompt and generates nothing: its prompt_logprobs
    cover a prompt as long as the whole context.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    banned_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's plus the top k
    prompt_logprobs: int | None = None
    seed: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ConfigError(f"logit_bias={self.logit_bias!r:.60} must map token ids to biases")
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"logit_bias={self.logit_bias!r:.60} must map integer token ids to "
                                  "numbers") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ConfigError naming the first option out of range; returns self for chaining."""
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), name,
                   value, "must be a finite number")
        _check(self.stop is None or (isinstance(self.stop, list) and all(isinstance(x, str) for x in self.stop)),
               "stop", self.stop, "must be a string or a list of strings")
        _check(all(math.isfinite(v) for v in (self.logit_bias or {}).values()), "logit_bias", self.logit_bias,
               "must map token ids to finite biases (use banned_token_ids to forbid a token)")
        extra_samples = self.n - 1 if is_int(self.n) and self.n > 1 else 0  # sample j of n uses seed + j
        _check(self.seed is None or (is_int(self.seed) and -2**63 <= self.seed and self.seed + extra_samples < 2**64),
               "seed", self.seed, "must be an integer that fits in 64 bits (sample j of n uses seed + j)")
        _check(is_int(self.n) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0 (0 means greedy)")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k,
               "must be an integer >= 1, or 0 / -1 to disable")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty,
               "must be in [-2, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty,
               "must be > 0 (1 disables it)")
        _check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 0),
               "max_tokens", self.max_tokens, "must be an integer >= 0 (0: score the prompt only; None: fill the "
               "context)")
        _check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens,
               "must be an integer >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"must not exceed max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (is_int(value) and 0 <= value <= MAX_LOGPROBS), name, value,
                   f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop", self.stop,
               "must be non-empty strings")
        if vocab_size is not None:
            for name, ids in (("stop_token_ids", self.stop_token_ids), ("banned_token_ids", self.banned_token_ids),
                              ("logit_bias", list(self.logit_bias or {}))):
                bad = [i for i in ids or [] if not 0 <= int(i) < vocab_size]
                _check(not bad, name, ids, f"holds token id {bad[0] if bad else None}, outside the vocabulary "
                                           f"[0, {vocab_size})")
            banned = set(self.banned_token_ids or [])
            _check(len(banned) < vocab_size, "banned_token_ids", f"{len(banned)} ids", "ban every token of the "
                   "vocabulary, so nothing could be generated; ban fewer tokens")
        return self

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


@dataclass
class GenerationConfig(SamplingParams):
    """`SamplingParams` plus beam search; greedy by default, as transformers' `generate()`.

    max_new_tokens is transformers' name for max_tokens (set either). Beam search follows
    transformers exactly: num_beams, length_penalty (score = sum logprobs / length**penalty),
    early_stopping True | False | "never"; it returns the n best beams (n <= num_beams).
    """

    temperature: float = 0.0
    max_tokens: int | None = None
    max_new_tokens: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_ids: list[int] | None = field(default=None)  # None: the model's / tokenizer's EOS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens is not None:
            self.max_tokens = self.max_new_tokens
        self.max_new_tokens = self.max_tokens

    def replace(self, **changes) -> GenerationConfig:
        if "max_tokens" in changes and "max_new_tokens" not in changes:
            changes["max_new_tokens"] = changes["max_tokens"]
        return dataclasses.replace(self, **changes)

    def validate(self, vocab_size: int | None = None) -> GenerationConfig:
        super().validate(vocab_size)
        _check(self.max_tokens != 0, "max_tokens", self.max_tokens,
               "(score the prompt, generate nothing) is for the engine: lmstack.LLM with SamplingParams(max_tokens=0, "
               "prompt_logprobs=k); for one prompt, lmstack.infer.prompt_logprobs(model, ids) scores it")
        _check(is_int(self.num_beams) and self.num_beams >= 1, "num_beams", self.num_beams,
               "must be an integer >= 1")
        _check(self.early_stopping in (True, False, "never"), "early_stopping", self.early_stopping,
               'must be true, false or "never"')
        if self.num_beams > 1:
            _check(self.n <= self.num_beams, "n", self.n, f"must not exceed num_beams={self.num_beams}")
            _check(self.temperature == 0.0, "temperature", self.temperature,
                   "must be 0 with num_beams > 1 (beam search is deterministic here)")
            _check(not self.stop_strings, "stop", self.stop,
                   "is not supported with beam search; use stop_token_ids or num_beams=1")
            _check(self.logprobs is None, "logprobs", self.logprobs,
                   "is not returned by beam search (a beam's score is in cumulative_logprob); use num_beams=1")
        return self


def _check(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} {what}")
