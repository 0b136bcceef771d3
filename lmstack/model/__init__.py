"""The decoder-only Transformer and its building blocks."""

from lmstack.model.cache import KVCache
from lmstack.model.transformer import CausalLMOutput, Transformer

__all__ = ["CausalLMOutput", "KVCache", "Transformer"]
