"""A tiny random model with a real byte-level BPE tokenizer (ChatML template), saved to a directory."""

from __future__ import annotations

from pathlib import Path

from hf_models import randomize_

import lmstack
from lmstack.config import get_preset
from lmstack.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Héllo wörld, naïve café ✓ 日本語のテキスト. "
        "To be, or not to be, that is the question. ") * 20


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=300, min_frequency=1)


def tiny_model_dir(path: Path, family: str = "llama", context: int = 256, seed: int = 1) -> Path:
    tokenizer = tiny_tokenizer()
    config = get_preset(f"tiny-{family}").replace(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model, _ = lmstack.load(f"tiny-{family}", random_init=True, config=config, seed=0)
    randomize_(model, seed=seed, std=0.15)
    model.save_pretrained(path, tokenizer=tokenizer)
    return Path(path)
