"""Incremental detokenization for streaming: emit only new, complete text as tokens arrive.

A byte-level token can end in the middle of a UTF-8 character, and decoders such as
WordPiece or Metaspace only know a token's spacing from its neighbour. So, as vLLM and
transformers' TextStreamer do, we decode a small window that starts one emitted chunk back
and emit what it adds beyond the text already sent; text ending in U+FFFD (an unfinished
character) is held back until the character completes or `flush()` is called.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"
_CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
_CLEANUP_PREFIXES = tuple(sorted({p[:k] for p in _CLEANUP_PATTERNS for k in range(1, len(p))}))


class StreamDecoder:
    """`push(ids) -> new text`, `flush() -> rest`; the pieces concatenate to `decode(all ids)`."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for the decoder's spacing rules
        self.read_offset = 0  # tokens up to here have been emitted
        # WordPiece-style decoders clean up " ." -> "." and " ' s" -> "'s": a tail that may
        # still be rewritten waits for the next token.
        rewrites = getattr(tokenizer, "decode_rewrites_spaces", False)
        self._unsettled_tails = _CLEANUP_PREFIXES if rewrites else ()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: int | list[int]) -> str:
        """Add token ids; return the text they complete (possibly '')."""
        if isinstance(token_ids, int):
            self.ids.append(token_ids)
        else:
            self.ids.extend(int(t) for t in token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        seen = self._decode(self.ids[self.prefix_offset:self.read_offset])
        end = len(self.ids)
        text = self._decode(self.ids[self.prefix_offset:end])
        if not final:
            # Hold back an unfinished character (or a tail the decoder may still rewrite); a character
            # spans at most 4 byte tokens, so the longest clean prefix is at most 4 tokens shorter.
            while not self._complete(text, seen):
                end -= 1
                if end <= self.read_offset or end < len(self.ids) - 4:
                    return ""
                text = self._decode(self.ids[self.prefix_offset:end])
        self.prefix_offset, self.read_offset = self.read_offset, end
        # At flush, a decoder that rewrote already-sent text cannot take it back; send the rest.
        return text[len(seen):]

    def _complete(self, text: str, seen: str) -> bool:
        if text.endswith(_REPLACEMENT) or not text.startswith(seen):
            return False
        return not (self._unsettled_tails and text[len(seen):].endswith(self._unsettled_tails))

    def reset(self) -> None:
        self.ids.clear()
        self.prefix_offset = self.read_offset = 0
