"""Token log-probabilities in OpenAI's two formats.

Completions use the legacy parallel lists (`tokens`, `token_logprobs`, `top_logprobs` as
{token: logprob} dicts, `text_offset`); chat uses `content: [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]`. A token's text is its own decode (a byte-level
token inside a multi-byte character decodes to U+FFFD, as in vLLM); its `bytes` are exact:
recovered from the byte-level alphabet or `<0xNN>` byte-fallback tokens when the vocabulary
has them.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache

from lmstack.serve.protocol import ChatTokenLogprob, CompletionLogprobs, PromptLogprob, TopLogprob

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the byte-level alphabet back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI and vLLM send -9999.0 for impossible tokens.
    return x if math.isfinite(x) else -9999.0


class TokenTexts:
    """Per-token text and bytes for one tokenizer, cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        try:
            spec = json.loads(tokenizer.backend.to_str())
        except Exception:  # a tokenizer-like object without a `tokenizers` backend
            spec = {}
        self.byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
        # computed now (one pass over the vocabulary) so the parsed tokenizer.json is not kept
        self._chars_per_token = _max_chars_per_token(spec) if self.byte_level else None

    def max_chars_per_token(self) -> int | None:
        """An upper bound on how many characters of input text one token can stand for, or None
        when this tokenizer gives no such bound (a normalizer or pre-tokenizer that drops text,
        added tokens that swallow whitespace). A text longer than max_model_len times this can
        never fit in the context, so it is refused before it is tokenized.

        The bound holds for byte-level BPE: without a normalizer every input byte belongs to
        exactly one token, and a character is at least one byte; NFC composition turns at most
        two characters into each byte of the result, hence the factor 2.
        """
        return self._chars_per_token

    def text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = self._exact_bytes(token_id)
        return raw

    def _exact_bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is not None:
            m = _BYTE_FALLBACK.match(piece)
            if m:
                return [int(m.group(1), 16)]
            table = _byte_decoder()
            if self.byte_level and all(c in table for c in piece):
                return [table[c] for c in piece]
        return list(self.text(token_id).encode("utf-8"))


def _max_chars_per_token(spec: dict) -> int | None:
    """`TokenTexts.max_chars_per_token` from a byte-level tokenizer's parsed tokenizer.json."""
    if (spec.get("model") or {}).get("type") != "BPE":
        return None
    normalizer = spec.get("normalizer")
    factor = {None: 1, "NFC": 2}.get(None if normalizer is None else normalizer.get("type"), 0)
    if not factor:
        return None

    def lossless(pre: dict | None) -> bool:
        if pre is None:
            return False  # byte-level BPE always has a ByteLevel pre-tokenizer
        kind = pre.get("type")
        if kind == "Sequence":
            return all(lossless(p) or p.get("type") in ("Split", "Digits", "Punctuation")
                       and p.get("behavior") != "Removed" for p in pre.get("pretokenizers", []))
        return kind == "ByteLevel"

    if not lossless(spec.get("pre_tokenizer")) or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    table = _byte_decoder()
    longest = max((len(t.get("content", "")) for t in added), default=1)
    for piece in (spec.get("model") or {}).get("vocab", {}):
        longest = max(longest, len(piece) if all(c in table for c in piece) else len(piece.encode("utf-8")))
    return longest * factor


def completion_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list[float | None],
                        top: list[dict[int, float] | None] | None, text_offset: int) -> CompletionLogprobs:
    """The legacy format for a run of tokens; offsets count from `text_offset` in the choice's text.

    Each top_logprobs dict holds the top-k alternatives and the chosen token (vLLM's rule), or
    None where there is no prediction (the first prompt token).
    """
    out = CompletionLogprobs()
    offset = text_offset
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        token = texts.text(tid)
        out.tokens.append(token)
        out.token_logprobs.append(None if lp is None else _finite(lp))
        alternatives = top[i] if top is not None and i < len(top) else None
        if lp is None:
            out.top_logprobs.append(None)
        else:
            entry = {texts.text(t): _finite(v) for t, v in (alternatives or {}).items()}
            entry.setdefault(token, _finite(lp))
            out.top_logprobs.append(entry)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list[float],
                  top: list[dict[int, float]] | None, num_top: int) -> list[ChatTokenLogprob]:
    """Chat's `logprobs.content` entries for a run of generated tokens."""
    out = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        alternatives = (top[i] if top is not None and i < len(top) else None) or {}
        best = sorted(alternatives.items(), key=lambda kv: -kv[1])[:num_top]
        out.append(ChatTokenLogprob(
            token=texts.text(tid), logprob=_finite(lp), bytes=texts.bytes(tid),
            top_logprobs=[TopLogprob(token=texts.text(t), logprob=_finite(v), bytes=texts.bytes(t)) for t, v in best],
        ))
    return out


def prompt_logprobs_vllm(texts: TokenTexts, token_ids: list[int], logprobs: list[float | None] | None,
                         top: list[dict[int, float] | None] | None) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first: nothing precedes it) or
    {token id as a string: {logprob, rank, decoded_token}} holding the prompt token itself, then
    the top-k alternatives (k = prompt_logprobs) ranked 1..k. The prompt token's rank is known
    when it is among the top k; otherwise it is null (the engine reports only the top k).
    """
    out: list[dict[str, PromptLogprob] | None] = []
    logprobs = list(logprobs or [])
    for i, tid in enumerate(token_ids):
        lp = logprobs[i] if i < len(logprobs) else None
        if lp is None:
            out.append(None)
            continue
        alternatives = (top[i] if top is not None and i < len(top) else None) or {}
        ranked = sorted(alternatives.items(), key=lambda kv: -kv[1])
        ranks = {t: r for r, (t, _) in enumerate(ranked, start=1)}
        entry = {str(tid): PromptLogprob(logprob=_finite(lp), rank=ranks.get(tid), decoded_token=texts.text(tid))}
        for t, v in ranked:
            entry.setdefault(str(t), PromptLogprob(logprob=_finite(v), rank=ranks[t], decoded_token=texts.text(t)))
        out.append(entry)
    return out
