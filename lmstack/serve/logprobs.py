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

from lmstack.serve.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

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
            decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}
        except Exception:  # a tokenizer-like object without a `tokenizers` backend
            decoder = {}
        self.byte_level = "ByteLevel" in json.dumps(decoder)

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
