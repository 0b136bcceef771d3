"""Logits processors and token sampling for a batch whose rows each have their own options.

`SamplingTensors.from_params` turns a list of per-request `SamplingParams` into per-row
tensors once; `process_logits` then applies every processor to a (B, V) logits tensor with
tensor ops only, and `sample` draws the next tokens, so a GPU step never waits for the host.
The engine builds the same tensors for whatever requests share a step; `TokenCounts` holds the
per-row token counts the penalties need and can be sliced/stacked as requests come and go.

Order (transformers' order): logit bias, repetition penalty, presence/frequency penalties,
banned ids, min_tokens (EOS/stop ids suppressed), then temperature, top-k, top-p, min-p.

Seeds: a seeded row draws its noise from its own `torch.Generator` (seeded once per request
and advanced only by that request), so its tokens do not depend on the batch it shares.
Sampling uses the exponential race (argmax p_i / q_i with q_i ~ Exp(1)), which draws exactly
from p without `multinomial`'s host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmstack.errors import ConfigError
from lmstack.infer.params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class SamplingTensors:
    """Per-row options as tensors (B rows); flags skip processors no row uses."""

    temperature: torch.Tensor  # (B,) float32, 1.0 on greedy rows so dividing is a no-op
    greedy: torch.Tensor  # (B,) bool
    top_k: torch.Tensor  # (B,) int64, V where disabled
    top_p: torch.Tensor  # (B,) float32
    min_p: torch.Tensor  # (B,) float32
    repetition_penalty: torch.Tensor  # (B,) float32
    presence_penalty: torch.Tensor  # (B,) float32
    frequency_penalty: torch.Tensor  # (B,) float32
    min_tokens: torch.Tensor  # (B,) int64
    logit_bias: torch.Tensor | None  # (B, V) float32
    banned: torch.Tensor | None  # (B, V) bool
    stop_ids: torch.Tensor | None  # (B, V) bool: suppressed while fewer than min_tokens were generated
    generators: list[torch.Generator | None]  # per row; None draws from the default generator
    max_top_k: int  # largest enabled top_k (0: no row uses top-k)
    do_top_p: bool
    do_min_p: bool
    do_repetition: bool
    do_presence_frequency: bool
    all_greedy: bool
    vocab_size: int

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str = "cpu",
                    eos_token_ids: Sequence[int] | None = None,
                    generators: Sequence[torch.Generator | None] | None = None) -> SamplingTensors:
        """Build the tensors for rows `params` (validated here: a bad option fails before any work).

        eos_token_ids: suppressed during min_tokens unless a row has ignore_eos. generators: one
        per row (see `make_generator`); by default a seeded row gets a fresh one from its seed.
        """
        if not params:
            raise ConfigError("no requests to sample for: params is empty")
        B, V = len(params), vocab_size
        for p in params:
            p.validate(vocab_size)

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.temperature == 0.0 for p in params]
        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        logit_bias = banned = stop_ids = None
        if any(p.logit_bias for p in params):
            logit_bias = torch.zeros(B, V, dtype=torch.float32)
            for i, p in enumerate(params):
                for token, bias in (p.logit_bias or {}).items():
                    logit_bias[i, token] = bias
            logit_bias = logit_bias.to(device)
        if any(p.banned_token_ids for p in params):
            banned = torch.zeros(B, V, dtype=torch.bool)
            for i, p in enumerate(params):
                banned[i, list(p.banned_token_ids or [])] = True
            banned = banned.to(device)
        if any(p.min_tokens > 0 for p in params):
            stop_ids = torch.zeros(B, V, dtype=torch.bool)
            for i, p in enumerate(params):
                ids = set(p.stop_token_ids or []) | (set() if p.ignore_eos else set(eos_token_ids or []))
                stop_ids[i, sorted(ids)] = True
                blocked = ids | set(p.banned_token_ids or [])
                if p.min_tokens > 0 and len(blocked) >= V:
                    raise ConfigError(f"min_tokens={p.min_tokens} with banned_token_ids and stop ids blocks every "
                                      "token of the vocabulary; nothing could be generated")
            stop_ids = stop_ids.to(device)
        if generators is None:
            generators = [make_generator(p.seed, device) for p in params]
        return cls(
            temperature=col([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
            greedy=col(greedy, torch.bool),
            top_k=col(top_k, torch.int64),
            top_p=col([p.top_p for p in params], torch.float32),
            min_p=col([p.min_p for p in params], torch.float32),
            repetition_penalty=col([p.repetition_penalty for p in params], torch.float32),
            presence_penalty=col([p.presence_penalty for p in params], torch.float32),
            frequency_penalty=col([p.frequency_penalty for p in params], torch.float32),
            min_tokens=col([p.min_tokens for p in params], torch.int64),
            logit_bias=logit_bias, banned=banned, stop_ids=stop_ids,
            generators=list(generators),
            vocab_size=V, **_switches(params, V),
        )

    def select(self, rows: Sequence[int], params: Sequence[SamplingParams] | None = None,
               index: torch.Tensor | None = None) -> SamplingTensors:
        """The tensors of some rows (duplicates allowed: n samples, beams); generators are shared.

        params: the kept rows' options, when rows were dropped; the switches are recomputed from
        them, so a row that left with penalties or min_tokens does not leave its processor on
        (it would ask for token counts nobody needs). index: `rows` already on the device (a
        caller that must not synchronise builds it with a non-blocking copy).
        """
        rows = list(rows)
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.temperature.device) if index is None else index
        out = {}
        for f in self.__dataclass_fields__:
            value = getattr(self, f)
            out[f] = value.index_select(0, idx) if isinstance(value, torch.Tensor) else value
        out["generators"] = [self.generators[i] for i in rows]
        if params is not None:
            out.update(_switches(params, self.vocab_size))
            for name, used in (("logit_bias", any(p.logit_bias for p in params)),
                               ("banned", any(p.banned_token_ids for p in params)),
                               ("stop_ids", any(p.min_tokens > 0 for p in params))):
                if not used:
                    out[name] = None
        return SamplingTensors(**out)


def _switches(params: Sequence[SamplingParams], vocab_size: int) -> dict:
    """Which processors rows `params` need (the flags of `SamplingTensors`)."""
    greedy = [p.temperature == 0.0 for p in params]
    return dict(
        max_top_k=max((p.top_k for p, g in zip(params, greedy) if 0 < p.top_k < vocab_size and not g), default=0),
        do_top_p=any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)),
        do_min_p=any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)),
        do_repetition=any(p.repetition_penalty != 1.0 for p in params),
        do_presence_frequency=any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params),
        all_greedy=all(greedy),
    )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator for a seeded request (None for unseeded ones, which use torch's default RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


class TokenCounts:
    """Per-row token statistics for the penalties: prompt tokens seen, generated-token counts."""

    def __init__(self, prompt_seen: torch.Tensor, output_counts: torch.Tensor, num_generated: torch.Tensor):
        self.prompt_seen = prompt_seen  # (B, V) bool
        self.output_counts = output_counts  # (B, V) int32
        self.num_generated = num_generated  # (B,) int64

    @classmethod
    def from_prompts(cls, prompts: Sequence[Sequence[int]], vocab_size: int,
                     device: torch.device | str = "cpu") -> TokenCounts:
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool)
        for i, ids in enumerate(prompts):
            if len(ids):
                seen[i, torch.as_tensor(list(ids), dtype=torch.long)] = True
        B = len(prompts)
        return cls(seen.to(device), torch.zeros(B, vocab_size, dtype=torch.int32, device=device),
                   torch.zeros(B, dtype=torch.int64, device=device))

    def update(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Count one new token per row (rows where `active` is False are left unchanged)."""
        inc = torch.ones_like(tokens, dtype=torch.int32) if active is None else active.to(torch.int32)
        self.output_counts.scatter_add_(1, tokens[:, None], inc[:, None])
        self.num_generated += inc.to(torch.int64)

    def select(self, rows: Sequence[int] | torch.Tensor) -> TokenCounts:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.output_counts.device)
        return TokenCounts(self.prompt_seen.index_select(0, idx), self.output_counts.index_select(0, idx),
                           self.num_generated.index_select(0, idx))

    @staticmethod
    def stack(parts: Sequence[TokenCounts]) -> TokenCounts:
        return TokenCounts(torch.cat([p.prompt_seen for p in parts]), torch.cat([p.output_counts for p in parts]),
                           torch.cat([p.num_generated for p in parts]))


# ---- processors (each usable alone; tests compare them with transformers' and float64) ----------

def apply_penalties(logits: torch.Tensor, t: SamplingTensors, counts: TokenCounts | None) -> torch.Tensor:
    """Logit bias, repetition / presence / frequency penalties, banned ids, min_tokens suppression."""
    if t.logit_bias is not None:
        logits = logits + t.logit_bias
    if counts is not None and t.do_repetition:
        seen = counts.prompt_seen | (counts.output_counts > 0)
        penalty = t.repetition_penalty[:, None]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalized, logits)
    if counts is not None and t.do_presence_frequency:
        c = counts.output_counts.to(logits.dtype)
        logits = logits - t.frequency_penalty[:, None] * c - t.presence_penalty[:, None] * (c > 0).to(logits.dtype)
    if t.banned is not None:
        logits = logits.masked_fill(t.banned, NEG_INF)
    if t.stop_ids is not None and counts is not None:
        too_early = (counts.num_generated < t.min_tokens)[:, None]
        logits = logits.masked_fill(t.stop_ids & too_early, NEG_INF)
    return logits


def apply_temperature(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    return logits / t.temperature[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's top_k highest logits (ties with the k-th kept, as transformers does)."""
    if max_top_k <= 0:
        return logits
    k = min(max_top_k, logits.shape[-1])
    values = logits.topk(k, dim=-1).values  # (B, k) descending
    kth = values.gather(1, (top_k.clamp(max=k) - 1)[:, None])
    keep_all = (top_k >= logits.shape[-1])[:, None]
    return logits.masked_fill((logits < kth) & ~keep_all, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter, transformers' rule: drop the smallest tokens whose total mass is <= 1 - top_p."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)[:, None]
    remove[:, -1] = False  # always keep the most likely token
    remove = remove & (top_p < 1.0)[:, None]
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's (transformers' rule)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, t: SamplingTensors, counts: TokenCounts | None = None) -> torch.Tensor:
    """Every processor in order; float32 in, float32 out. Greedy rows skip the sampling filters."""
    logits = apply_penalties(logits.float(), t, counts)
    if t.all_greedy:
        return logits
    logits = apply_temperature(logits, t)
    if t.max_top_k:
        logits = apply_top_k(logits, torch.where(t.greedy, logits.shape[-1], t.top_k), t.max_top_k)
    if t.do_top_p:
        logits = apply_top_p(logits, torch.where(t.greedy, 1.0, t.top_p))
    if t.do_min_p:
        logits = apply_min_p(logits, torch.where(t.greedy, 0.0, t.min_p))
    return logits


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Next token per row from processed logits: argmax on greedy rows, a draw on the others."""
    greedy_tokens = logits.argmax(dim=-1)
    if t.all_greedy:
        return greedy_tokens
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    noise.exponential_()
    for row, gen in enumerate(t.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(t.greedy, greedy_tokens, sampled)


def logprobs_of(raw_logits: torch.Tensor, tokens: torch.Tensor, top_k: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The model's log-probabilities (before processing, as vLLM v1 reports them).

    Returns (logprob of `tokens` (B,), top-k logprobs (B, k), top-k ids (B, k)); top-k parts
    are None when top_k is 0.
    """
    logp = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    if top_k <= 0:
        return chosen, None, None
    values, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    return chosen, values, ids
