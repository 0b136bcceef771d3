"""Train a byte-level BPE tokenizer with the `tokenizers` library (Rust, parallel).

The result is laid out like Llama-3's and Qwen's tokenizer.json: a GPT-4-style split regex,
byte-level pre-tokenizer and decoder, no normalizer (so decode(encode(text)) == text), and
special tokens appended after the learned vocabulary. The config written beside it names
bos/eos/pad and carries a ChatML template, so transformers loads it unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from lmstack.errors import TokenizerError
from lmstack.tokenizer.chat import CHATML_TEMPLATE, CHATML_TOKENS
from lmstack.tokenizer.tokenizer import Tokenizer

# GPT-4 / Llama-3 split: contractions, words, 1-3 digit groups, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", *CHATML_TOKENS)
BYTE_ALPHABET_SIZE = 256


def byte_level_backend(add_bos: str | None = None, add_eos: str | None = None) -> _HFTokenizer:
    """An untrained byte-level BPE pipeline (GPT-4 split + byte-level bytes)."""
    backend = _HFTokenizer(models.BPE(byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _post_processor(backend: _HFTokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """The same TemplateProcessing transformers builds from add_bos_token/add_eos_token."""
    single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
    pair = single + " " + " ".join([f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _split_inputs(texts_or_files: Any) -> tuple[list[str] | None, Iterable[str] | None]:
    """Path-like inputs are files, strings are texts; a mix is an error."""
    if isinstance(texts_or_files, (str, bytes)):
        raise TokenizerError("pass a list of texts (or of pathlib.Path files), not a single string")
    if isinstance(texts_or_files, os.PathLike):
        texts_or_files = [texts_or_files]
    if isinstance(texts_or_files, (list, tuple)) and texts_or_files and all(
            isinstance(x, os.PathLike) for x in texts_or_files):
        files = [str(Path(x)) for x in texts_or_files]
        for f in files:
            if not Path(f).is_file():
                raise TokenizerError(f"tokenizer training file {f} does not exist")
        return files, None
    return None, texts_or_files


def _checked_texts(texts: Iterable[str], seen: dict[str, int]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"training text {i} is {type(text).__name__}, expected str "
                                 "(wrap file names in pathlib.Path to train on files)")
        seen["chars"] += len(text)
        yield text


def train_bpe(texts_or_files: Any, vocab_size: int, special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
              min_frequency: int = 2, bos_token: str | None = "<|bos|>", eos_token: str | None = "<|eos|>",
              pad_token: str | None = "<|pad|>", add_bos_token: bool = False, add_eos_token: bool = False,
              model_max_length: int = 2048, chat_template: str | None = None, max_token_length: int | None = None,
              show_progress: bool = False) -> Tokenizer:
    """Train byte-level BPE. `vocab_size` = 256 bytes + merges; special tokens are added after it.

    bos/eos/pad name special tokens (added if missing from `special_tokens`); `add_bos_token`
    makes `encode(..., add_special_tokens=True)` prepend BOS. The chat template defaults to
    ChatML when the ChatML markers are among the special tokens.
    """
    if vocab_size < BYTE_ALPHABET_SIZE:
        raise TokenizerError(f"vocab_size={vocab_size} is below the {BYTE_ALPHABET_SIZE} byte tokens a "
                             "byte-level tokenizer needs; use 256 for pure bytes or more for merges")
    if min_frequency < 1:
        raise TokenizerError(f"min_frequency={min_frequency} must be >= 1")
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
        raise TokenizerError(f"model_max_length={model_max_length!r} must be a positive number of tokens "
                             "(the longest input the model takes, e.g. 2048)")
    specials = list(dict.fromkeys([*special_tokens, *(t for t in (bos_token, eos_token, pad_token) if t)]))
    files, texts = _split_inputs(texts_or_files)
    backend = byte_level_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
        max_token_length=max_token_length,
    )
    if files is not None:
        empty = [f for f in files if os.path.getsize(f) == 0]
        if len(empty) == len(files):
            raise TokenizerError(f"tokenizer training files {', '.join(files)} are empty; give a corpus with text")
        backend.train(files, trainer)
    else:
        seen = {"chars": 0}
        backend.train_from_iterator(_checked_texts(texts, seen), trainer)
        if not seen["chars"]:
            raise TokenizerError("the tokenizer training corpus is empty (no text at all); give texts to learn from")
    learned = backend.get_vocab_size(with_added_tokens=False)
    if learned < BYTE_ALPHABET_SIZE:
        raise TokenizerError(f"training produced only {learned} tokens; is the corpus empty?")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = _post_processor(backend, bos_token if add_bos_token else None,
                                             eos_token if add_eos_token else None)
    if chat_template is None and all(t in specials for t in CHATML_TOKENS):
        chat_template = CHATML_TEMPLATE
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": None,
        "add_bos_token": add_bos_token, "add_eos_token": add_eos_token,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,

    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return Tokenizer(backend, config)
