"""Tokenizers: load/save HF tokenizer files, encode and decode."""

from lmstack.tokenizer.stream import StreamDecoder
from lmstack.tokenizer.tokenizer import Tokenizer

__all__ = ["StreamDecoder", "Tokenizer"]
