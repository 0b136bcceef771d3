"""OpenAI-compatible HTTP server over the batched engine: `create_app`, `ServeConfig`, `run_server`."""

from lmstack.serve.admission import ServeLimits
from lmstack.serve.app import ServeConfig, create_app
from lmstack.serve.safety import SafetyFilter
from lmstack.serve.server import run_server

__all__ = ["SafetyFilter", "ServeConfig", "ServeLimits", "create_app", "run_server"]
