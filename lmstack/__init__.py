"""lmstack: the whole life of a large language model in one hackable package.

    model, tokenizer = lmstack.load("path/to/hf-dir")          # or a preset, random_init=True
    model.save_pretrained("out/")                               # loads in transformers and vLLM

Attributes are imported lazily so the `lmstack` command starts without loading torch.
"""

from __future__ import annotations

from lmstack.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "PRESETS": "lmstack.config",
    "ModelConfig": "lmstack.config",
    "get_preset": "lmstack.config",
    "LmstackError": "lmstack.errors",
    "load": "lmstack.loading",
    "Transformer": "lmstack.model",
    "KVCache": "lmstack.model",
    "Tokenizer": "lmstack.tokenizer",
    "LLM": "lmstack.engine",
    "AsyncEngine": "lmstack.engine",
    "SamplingParams": "lmstack.infer.params",
}
__getattr__, __all__ = lazy_exports(__name__, _LAZY)
