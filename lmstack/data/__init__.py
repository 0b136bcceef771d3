"""Data: sources, cleaning, token shards (`data prepare`), TokenDataset, SFT and preference data.

Imports are lazy so `import lmstack.data` stays cheap (workers and the CLI import parts).
"""

from __future__ import annotations

from lmstack.lazy import lazy_exports

_EXPORTS = {
    "TokenDataset": "lmstack.data.dataset",
    "PrepareConfig": "lmstack.data.pipeline",
    "PrepareReport": "lmstack.data.pipeline",
    "prepare": "lmstack.data.pipeline",
    "CleanConfig": "lmstack.data.clean",
    "iter_documents": "lmstack.data.sources",
    "resolve_inputs": "lmstack.data.sources",
    "SFTDataset": "lmstack.data.sft",
    "load_chat_records": "lmstack.data.sft",
    "tokenize_chat": "lmstack.data.sft",
    "PreferenceDataset": "lmstack.data.preference",
    "load_preference_records": "lmstack.data.preference",
    "tokenize_preference": "lmstack.data.preference",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
