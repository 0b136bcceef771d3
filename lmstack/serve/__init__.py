"""OpenAI-compatible HTTP server over the batched engine: `create_app`, `ServeConfig`, `run_server`.

Names are imported on first use, so `lmstack serve` can check its arguments (model directory,
safety config) before paying for FastAPI and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeLimits": "lmstack.serve.admission",
    "ServeConfig": "lmstack.serve.app",
    "create_app": "lmstack.serve.app",
    "SafetyFilter": "lmstack.serve.safety",
    "run_server": "lmstack.serve.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmstack.serve' has no attribute {name!r}")
