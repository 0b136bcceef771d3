"""The batched inference engine: paged KV cache, continuous batching, prefix caching, `LLM`, `AsyncEngine`."""

from lmstack.engine.core import EngineConfig, EngineCore
from lmstack.engine.engine import LLM, AsyncEngine, EngineDeadError, RequestStream
from lmstack.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from lmstack.infer.params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "EngineConfig", "EngineCore", "EngineDeadError", "EngineStats",
           "RequestOutput", "RequestStream", "SamplingParams"]
