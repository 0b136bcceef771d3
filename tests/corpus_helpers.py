"""Small corpora and a trained tokenizer shared by the tokenizer and data tests (built once per process)."""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

from lmstack.tokenizer import Tokenizer


@functools.cache
def stdlib_files(n: int = 40) -> tuple[Path, ...]:
    """The first n .py files of the running Python's stdlib (sorted, so the slice is stable)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(root.glob("*.py"))[:n])


@functools.cache
def stdlib_texts(n: int = 40) -> tuple[str, ...]:
    return tuple(p.read_text(encoding="utf-8") for p in stdlib_files(n))


@functools.cache
def trained_tokenizer(vocab_size: int = 1000) -> Tokenizer:
    """A byte-level BPE trained on a slice of the stdlib (about 0.2 s)."""
    return Tokenizer.train(list(stdlib_texts(40)), vocab_size)


def bert_style_dir(tmp_path):
    """A BERT-style WordPiece tokenizer (lowercasing, accent stripping, [CLS]/[SEP]) saved by transformers."""
    from tokenizers import BertWordPieceTokenizer, processors
    from transformers import PreTrainedTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    wp.train_from_iterator(list(stdlib_texts(20)) + ["Café naïve résumé 東京 tokyo"], vocab_size=800)
    backend = wp._tokenizer
    backend.post_processor = processors.BertProcessing(("[SEP]", backend.token_to_id("[SEP]")),
                                                       ("[CLS]", backend.token_to_id("[CLS]")))
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                 sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
                                 clean_up_tokenization_spaces=True)
    hf.save_pretrained(tmp_path)
    return tmp_path


CJK_TEXT = (
    "天地玄黃，宇宙洪荒。日月盈昃，辰宿列張。寒來暑往，秋收冬藏。"
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
    "모든 인간은 태어날 때부터 자유로우며 그 존엄과 권리에 있어 동등하다. 🐍🎉 emoji 👩‍👩‍👧"
)


def prepare_interrupted_after(config, items: int) -> None:
    """Run `data prepare` and interrupt it (KeyboardInterrupt) when it consumes item `items`, as a
    user's Ctrl-C would: the output directory keeps its checkpoint for a rerun to resume."""
    import pytest

    from lmstack.data import pipeline, prepare

    consume, calls = pipeline._Run.consume, {"n": 0}

    def interrupted(self, result):
        calls["n"] += 1
        if calls["n"] == items:
            raise KeyboardInterrupt
        return consume(self, result)

    pipeline._Run.consume = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare(config)
    finally:
        pipeline._Run.consume = consume
