"""OpenAI-compatible HTTP server over the batched engine: `create_app`, `ServeConfig`, `run_server`.

Names are imported on first use, so `lmstack serve` can check its arguments (model directory,
safety config) before paying for FastAPI and torch.
"""

from __future__ import annotations

from lmstack.lazy import lazy_exports

_EXPORTS = {
    "ServeLimits": "lmstack.serve.admission",
    "ServeConfig": "lmstack.serve.app",
    "create_app": "lmstack.serve.app",
    "SafetyFilter": "lmstack.serve.safety",
    "run_server": "lmstack.serve.server",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
