"""Tokenizer: a thin layer over Hugging Face `tokenizers` that reads and writes HF's files.

`tokenizer.json` holds the model (BPE, WordPiece, ...); `tokenizer_config.json` names the
special tokens and the chat template. We load both exactly as transformers lays them out so
a directory works in either library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from lmstack.errors import TokenizerError


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, config: dict[str, Any] | None = None):
        self.backend = backend
        self.config = dict(config or {})

    # ---- files -------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory} has no tokenizer.json")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as err:
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({err})") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as err:
                raise TokenizerError(f"{config_path} is not valid JSON ({err})") from None
        return cls(backend, config)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- special tokens ----------------------------------------------------------------
    def special_token(self, role: str) -> str | None:
        return _token_content(self.config.get(f"{role}_token"))

    def special_id(self, role: str) -> int | None:
        token = self.special_token(role)
        return self.backend.token_to_id(token) if token is not None else None

    @property
    def bos_token_id(self) -> int | None:
        return self.special_id("bos")

    @property
    def eos_token_id(self) -> int | None:
        return self.special_id("eos")

    @property
    def pad_token_id(self) -> int | None:
        return self.special_id("pad")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    # ---- encode / decode ---------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
