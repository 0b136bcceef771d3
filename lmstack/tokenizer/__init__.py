"""Tokenizers: load/save HF tokenizer files, encode and decode."""

from lmstack.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
