"""The server's view of an engine: a small adapter over `lmstack.engine.AsyncEngine`.

Everything the HTTP layer needs from the engine goes through this class (streamed
generation, abort, stats, health, embeddings), so the server depends on a handful of calls
rather than on the engine's internals. Embeddings are not an engine feature: they run the
engine's model directly (one forward with `output_hidden_states=True`, mean-pooled), off the
event loop, one at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from lmstack.infer.params import SamplingParams


class EngineClient:
    def __init__(self, engine: Any):
        self.engine = engine
        core = engine.core
        self.model = core.model
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = core.max_model_len
        self.vocab_size: int = core.vocab_size
        self._embed_lock = threading.Lock()

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[Any]:
        """Streamed `RequestOutput`s, each holding only what is new; closing it early aborts the request."""
        return self.engine.generate(list(prompt_token_ids), params, request_id=request_id)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise the engine's own error for a request it could never serve (e.g. too big for the KV
        pool) now, before a streamed response has sent its 200."""
        self.engine.core.make_request(list(prompt_token_ids), params)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def stats(self) -> Any:
        return self.engine.stats()

    @property
    def is_healthy(self) -> bool:
        return bool(self.engine.is_healthy)

    @property
    def error(self) -> BaseException | None:
        return getattr(self.engine, "error", None)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    async def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised final hidden states (after the final norm), one vector per input."""
        return await asyncio.to_thread(self._embed_sync, batch)

    def _embed_sync(self, batch: list[list[int]]) -> list[list[float]]:
        out = []
        device = next(self.model.parameters()).device
        with self._embed_lock, torch.inference_mode():
            for ids in batch:
                x = torch.tensor([ids], dtype=torch.long, device=device)
                hidden = self.model(x, output_hidden_states=True, logits_to_keep=1).hidden_states
                pooled = hidden[0].float().mean(dim=0)
                out.append(torch.nn.functional.normalize(pooled, dim=0).tolist())
        return out

    async def shutdown(self) -> None:
        await self.engine.shutdown()
