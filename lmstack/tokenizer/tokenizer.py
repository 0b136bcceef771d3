"""Tokenizer: a thin layer over Hugging Face `tokenizers` that reads and writes HF's files.

`tokenizer.json` holds the model (BPE, WordPiece, ...); `tokenizer_config.json` names the
special tokens and the chat template. We load both exactly as transformers lays them out
(also `chat_template.jinja` and `special_tokens_map.json`) so a directory works in either
library. Training lives in `train.py`, templates in `chat.py`, streaming in `stream.py`.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from lmstack.errors import TokenizerError
from lmstack.tokenizer.chat import ChatTemplate, select_template

SPECIAL_ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_RUNTIME_KEYS = ("backend", "is_local", "local_files_only", "name_or_path", "_commit_hash")
# compiled chat templates kept per tokenizer (the model's own, plus recent per-request ones on a server)
MAX_COMPILED_TEMPLATES = 16
# transformers' clean_up_tokenization: drop the space WordPiece-style decoders put before punctuation.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path} is not valid JSON ({err}); re-save the tokenizer") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                             "re-save it as UTF-8") from None


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_special_tokens(config: dict[str, Any], where: str | Path) -> None:
    """Every named special token (bos_token, eos_token, ...) is a string or {"content": str, ...}."""
    for role in SPECIAL_ROLES:
        key = f"{role}_token"
        value = config.get(key)
        if value is None or isinstance(value, str):
            continue
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            continue
        raise TokenizerError(
            f"{where}: {key} is {_describe(value)}; a special token must be a string such as \"<|eos|>\" "
            "or an object with a string \"content\" field; fix the file")


def check_chat_template(value: Any, where: str | Path) -> None:
    """chat_template is a string, a list of {"name": str, "template": str} or a {name: template} dict."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list):
        for i, entry in enumerate(value):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise TokenizerError(
                    f"{where}: chat_template[{i}] is {_describe(entry)}; a list of chat templates must hold "
                    "objects {\"name\": \"default\", \"template\": \"<jinja text>\"} with string values; "
                    "fix the file")
        return
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return
    raise TokenizerError(
        f"{where}: chat_template is {_describe(value)}; it must be a Jinja template string or a list of "
        "{\"name\": ..., \"template\": ...} objects; fix the file")


def _named_templates(value: str | list | dict | None) -> dict[str | None, str]:
    """{name: source} of a checked chat_template value (name None for a single template)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {None: value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value}
    return dict(value)


def _jinja_template_files(directory: Path) -> list[Path]:
    """The template files transformers reads: chat_template.jinja and additional_chat_templates/*.jinja."""
    found = [directory / "chat_template.jinja"] if (directory / "chat_template.jinja").is_file() else []
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        found += sorted(p for p in extra.glob("*.jinja") if p.is_file())
    return found


def _read_chat_templates(directory: Path, legacy: bool = True
                         ) -> tuple[str | list[dict[str, str]] | None, dict[str | None, Path]]:
    """transformers >= 4.43 may keep templates in chat_template.jinja and additional_chat_templates/.

    Returns the templates and, for error messages, the file each came from. With `legacy`,
    a chat_template.json is read when there are no .jinja files.
    """
    templates: dict[str, str] = {}
    origins: dict[str | None, Path] = {}
    default = directory / "chat_template.jinja"
    for path in _jinja_template_files(directory):
        name = "default" if path == default else path.stem
        templates[name] = _read_text(path)
        origins[name] = path
    legacy_path = directory / "chat_template.json"
    if not templates and legacy and legacy_path.is_file():
        template = _read_json(legacy_path).get("chat_template")
        if template:
            check_chat_template(template, legacy_path)
            return template, {name: legacy_path for name in _named_templates(template)}
    if not templates:
        return None, {}
    if list(templates) == ["default"]:
        return templates["default"], {None: default}
    return [{"name": name, "template": text} for name, text in templates.items()], origins


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the HF config around it (special tokens, chat template)."""

    def __init__(self, backend: _HFTokenizer, config: dict[str, Any] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self._templates: dict[str, ChatTemplate] = {}
        self._templates_lock = threading.Lock()

    # ---- training ----------------------------------------------------------------------
    @classmethod
    def train(cls, texts_or_files: Iterable[str] | Iterable[os.PathLike] | os.PathLike, vocab_size: int,
              special_tokens: Iterable[str] | None = None, min_frequency: int = 2, **options: Any) -> Tokenizer:
        """Train a byte-level BPE tokenizer; see `lmstack.tokenizer.train.train_bpe` for every option.

        `vocab_size` counts the learned vocabulary (256 bytes + merges); special tokens come on
        top, so 256 gives a pure byte-level tokenizer. Paths (`pathlib.Path`) are read as files,
        strings are texts.
        """
        from lmstack.tokenizer.train import DEFAULT_SPECIAL_TOKENS, train_bpe

        specials = DEFAULT_SPECIAL_TOKENS if special_tokens is None else tuple(special_tokens)
        return train_bpe(texts_or_files, vocab_size, special_tokens=specials, min_frequency=min_frequency,
                         **options)

    # ---- files -------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """From a directory with tokenizer.json (and tokenizer_config.json), or that tokenizer.json itself."""
        directory = Path(directory)
        if directory.is_file() and directory.name == "tokenizer.json":
            directory = directory.parent
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory} has no tokenizer.json; pass a Hugging Face tokenizer/model "
                                 "directory or train one with `lmstack tokenizer train`")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as err:
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({err})") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        origins: dict[str | None, Path] = {}
        if config_path.is_file():
            file_config = _read_json(config_path)
            check_special_tokens(file_config, config_path)
            check_chat_template(file_config.get("chat_template"), config_path)
            config.update(file_config)
            origins = {name: config_path for name in _named_templates(file_config.get("chat_template"))}
        special_map = directory / "special_tokens_map.json"
        # As transformers (PreTrainedTokenizerBase._from_pretrained): a config without
        # "added_tokens_decoder" is legacy, and special_tokens_map.json's tokens override its own;
        # a config with one is current, and special_tokens_map.json is not read at all.
        if special_map.is_file() and "added_tokens_decoder" not in config:
            special = {k: v for k, v in _read_json(special_map).items() if k.endswith("_token")}
            check_special_tokens(special, special_map)
            config.update(special)
        # As transformers (PreTrainedTokenizerBase.from_pretrained): .jinja template files take
        # priority over tokenizer_config.json's "chat_template"; chat_template.json is only a fallback.
        template, template_origins = _read_chat_templates(directory, legacy="chat_template" not in config)
        if template is not None:
            config["chat_template"] = template
            origins = template_origins
        tokenizer = cls(backend, config)
        tokenizer._compile_templates(origins)
        return tokenizer

    def _compile_templates(self, origins: dict[str | None, Path]) -> None:
        """Compile every chat template now, so a broken one is reported at load, naming its file."""
        for name, source in _named_templates(self.config.get("chat_template")).items():
            label = "chat template" if name is None else f"chat template {name!r}"
            if name in origins:
                label += f" in {origins[name]}"
            if source not in self._templates:
                self._templates[source] = ChatTemplate(source, label)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (the chat template inside it).

        chat_template.jinja and additional_chat_templates/*.jinja already in `directory` are
        removed: transformers (and `load`) prefer them to tokenizer_config.json, so a stale one
        would silently replace the template saved here. So is a special_tokens_map.json when the
        saved config has no "added_tokens_decoder": its tokens would override the saved ones.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise TokenizerError(f"cannot save the tokenizer to {directory}: it is a file; give a directory")
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        if config.get("chat_template") is None:
            config.pop("chat_template", None)
        if isinstance(config.get("chat_template"), dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in config["chat_template"].items()]
        for key in _RUNTIME_KEYS:  # what transformers 5 leaves in a loaded config
            config.pop(key, None)
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        stale_files = _jinja_template_files(directory)
        if "added_tokens_decoder" not in config and (directory / "special_tokens_map.json").is_file():
            stale_files.append(directory / "special_tokens_map.json")
        for stale in stale_files:
            stale.unlink()

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json: equal fingerprints give equal token ids."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    # ---- special tokens ----------------------------------------------------------------
    def special_token(self, role: str) -> str | None:
        return _token_content(self.config.get(f"{role}_token"))

    def special_id(self, role: str) -> int | None:
        token = self.special_token(role)
        return self.backend.token_to_id(token) if token is not None else None

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """{'bos_token': ..., 'eos_token': ...}: the named special tokens, as templates see them."""
        out = {}
        for role in SPECIAL_ROLES:
            token = self.special_token(role)
            if token is not None:
                out[f"{role}_token"] = token
        return out

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
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    @property
    def vocab_size(self) -> int:
        """How many tokens there are (as transformers' len(tokenizer)); see `id_space` for id ranges."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def id_space(self) -> int:
        """max(vocab_size, largest id + 1): the ids every encoding can produce lie in [0, id_space).

        Not `vocab_size`: a vocabulary with gaps (a WordLevel/WordPiece file whose ids skip
        numbers) has fewer tokens than its largest id, so sizing a dtype or an embedding by the
        count would wrap or overflow the high ids.
        """
        count = self.backend.get_vocab_size(with_added_tokens=True)
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max(count, max(vocab.values(), default=-1) + 1)

    @property
    def model_max_length(self) -> int | None:
        value = self.config.get("model_max_length")
        return int(value) if isinstance(value, (int, float)) and value < 1e12 else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- encode / decode ---------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        _check_text(text)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        for text in texts:
            _check_text(text)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; a partial UTF-8 sequence decodes to U+FFFD, never an error. Ids beyond the
        tokenizer (a model's padded vocabulary rows) decode to nothing; negative ids are an error."""
        try:
            ids = [operator.index(i) for i in ids]  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            raise TokenizerError(f"cannot decode {ids!r:.60}: token ids are integers >= 0") from None
        if ids and min(ids) < 0:
            raise TokenizerError(f"cannot decode token id {min(ids)}: token ids are integers >= 0")
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up_spaces:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    @property
    def _clean_up_spaces(self) -> bool:
        # As transformers: only for non-BPE models (WordPiece), where it cannot corrupt text.
        if not self.config.get("clean_up_tokenization_spaces"):
            return False
        return type(self.backend.model).__name__ != "BPE" or bool(
            self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))

    @property
    def decode_rewrites_spaces(self) -> bool:
        """True when decoding may rewrite text already decoded (WordPiece cleanup, " ." -> ".")."""
        return self._clean_up_spaces or type(self.backend.model).__name__ != "BPE"

    # ---- chat --------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if template is None or isinstance(template, str):
            return template
        return select_template(template)[0]

    def _compiled_template(self, tools: Any, chat_template: str | None) -> ChatTemplate:
        templates = self.config.get("chat_template")
        if chat_template is not None:
            named = templates if isinstance(templates, dict) else (
                {t["name"]: t["template"] for t in templates if isinstance(t, dict) and "name" in t
                 and "template" in t} if isinstance(templates, list) else {})
            source, name = (named[chat_template], f"chat template {chat_template!r}") if chat_template in named \
                else (chat_template, "chat template")
        else:
            source, name = select_template(templates, tools)
        with self._templates_lock:  # a server renders from several threads
            template = self._templates.pop(source, None) or ChatTemplate(source, name)
            self._templates[source] = template  # most recent last: a server's per-request templates stay bounded
            while len(self._templates) > MAX_COMPILED_TEMPLATES:
                self._templates.pop(next(iter(self._templates)))
        return template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, tokenize: bool = False,
                            chat_template: str | None = None, continue_final_message: bool | str = False,
                            **extra: Any) -> str | list[int]:
        """Render `messages` with the model's template (ChatML when it has none), like transformers.

        The template sees `messages`, `tools`, `documents`, `add_generation_prompt`, every named
        special token (`bos_token`, `eos_token`, ...) and `extra` (which wins over the tokens).
        `tokenize=True` returns ids, encoded without adding special tokens (the template writes them).
        `continue_final_message=True` ends the text right after the final message's content (no
        end-of-turn marker), so the model continues that message; it is transformers' algorithm
        (see `lmstack.tokenizer.chat`) and cannot be combined with `add_generation_prompt`.
        """
        template = self._compiled_template(tools, chat_template)
        variables = {**self.special_tokens_map, **extra}
        documents = variables.pop("documents", None)
        text = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                               documents=documents, continue_final_message=continue_final_message, **variables)
        return self.encode(text) if tokenize else text

    def chat_template_has_generation(self, tools: list[dict] | None = None, chat_template: str | None = None) -> bool:
        """True when the template `apply_chat_template` would use has `{% generation %}` blocks."""
        return self._compiled_template(tools, chat_template).has_generation_markers

    def assistant_tokens_mask(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                              tools: list[dict] | None = None, chat_template: str | None = None,
                              **extra: Any) -> tuple[list[int], list[int]]:
        """(input_ids, assistant_masks) as transformers' `apply_chat_template(..., tokenize=True,
        return_dict=True, return_assistant_tokens_mask=True)`.

        The ids encode the whole rendered text; a mask entry is 1 for the tokens from the one
        holding a `{% generation %}` block's first character to the one holding its last
        (transformers' char_to_token walk). All 0 when the template has no generation blocks.
        """
        if extra.get("continue_final_message"):
            raise TokenizerError("continue_final_message cannot be combined with an assistant tokens mask")
        extra.pop("continue_final_message", None)
        template = self._compiled_template(tools, chat_template)
        variables = {**self.special_tokens_map, **extra}
        documents = variables.pop("documents", None)
        text, spans = template.render_with_generation_spans(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents, **variables)
        _check_text(text)
        encoding = self.backend.encode(text, add_special_tokens=False)
        mask = [0] * len(encoding.ids)
        for start_char, end_char in spans:
            if end_char <= 0:  # an empty block at the very start (transformers fails on char -1): nothing
                continue
            start = encoding.char_to_token(start_char)
            end = encoding.char_to_token(end_char - 1)
            if start is None:  # as transformers: a span past the last token ends the walk
                break
            # transformers runs to the end when the last character has no token (`if end_token`, which
            # also reads token 0 as "none"; a block ending in the first token marks only that token here)
            for i in range(start, len(mask) if end is None else end + 1):
                mask[i] = 1
        return encoding.ids, mask

    def __repr__(self) -> str:
        model = type(self.backend.model).__name__
        return f"Tokenizer({model}, vocab_size={self.vocab_size}, eos={self.special_token('eos')!r})"


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate (U+D800..U+DFFF) in `text`, or None.

    JSON's \\ud800 escapes decode to such code points; they are not Unicode text, and neither
    UTF-8 nor the Rust tokenizer can encode them. `str.encode` finds them in C, fast for megabytes.
    """
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _check_text(text: str) -> None:
    """Text the tokenizer can encode: a str of valid Unicode (a lone surrogate would make the
    Rust tokenizer raise a bare TypeError)."""
    if not isinstance(text, str):
        raise TokenizerError(f"text to encode must be a str, got {type(text).__name__}")
    index = lone_surrogate(text)
    if index is not None:
        raise TokenizerError(f"the text is not valid Unicode: a lone surrogate {text[index]!r} at index "
                             f"{index}; send UTF-8 text")
