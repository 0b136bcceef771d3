"""StreamDecoder: pieces are complete text and concatenate to tokenizer.decode(all ids)."""

import functools
import tempfile
from pathlib import Path

from corpus_helpers import CJK_TEXT, bert_style_dir, trained_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.tokenizer import StreamDecoder, Tokenizer


@functools.cache
def byte_tokenizer() -> Tokenizer:
    """vocab 256: every UTF-8 byte is its own token, so multi-byte characters span several tokens."""
    return Tokenizer.train(["abc"], 256, special_tokens=["<|eos|>"], bos_token=None, pad_token=None)


@functools.cache
def wordpiece_tokenizer() -> Tokenizer:
    return Tokenizer.load(bert_style_dir(Path(tempfile.mkdtemp())))


def stream(tok, ids, chunks, skip_special_tokens=False):
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces, i = [], 0
    for size in chunks:
        if i >= len(ids):
            break
        step = ids[i:i + size]
        pieces.append(decoder.push(step[0] if size == 1 else step))
        i += size
    if i < len(ids):
        pieces.append(decoder.push(ids[i:]))
    pieces.append(decoder.flush())
    return pieces


chunk_sizes = st.lists(st.integers(1, 4), max_size=300)


@settings(max_examples=120, deadline=None)
@given(st.text(max_size=120), chunk_sizes, st.booleans())
def test_byte_level_stream_equals_decode(text, chunks, skip):
    for tok in (byte_tokenizer(), trained_tokenizer()):
        ids = tok.encode(text + "<|eos|>")
        pieces = stream(tok, ids, chunks, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)  # never a broken character


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 256), max_size=60), chunk_sizes)
def test_arbitrary_byte_tokens_never_raise(ids, chunks):
    """Any byte sequence, valid UTF-8 or not: no exception, and still the same text as decode."""
    tok = byte_tokenizer()
    assert "".join(stream(tok, ids, chunks)) == tok.decode(ids)


def test_characters_held_until_complete():
    tok = byte_tokenizer()
    ids = tok.encode("a🎉b")  # a, 4 bytes, b
    decoder = StreamDecoder(tok)
    assert decoder.push(ids[0]) == "a"
    assert [decoder.push(i) for i in ids[1:4]] == ["", "", ""]
    assert decoder.push(ids[4]) == "🎉"
    assert decoder.push(ids[5]) == "b" and decoder.flush() == ""
    decoder = StreamDecoder(tok)
    assert decoder.push(ids[:3]) == "a" and decoder.flush() == "\ufffd"  # an unfinished character at the end


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["Hello, World! It's a café.", "def f(x): return x ** 2", CJK_TEXT,
                        "a b c d e f g h"]), chunk_sizes)
def test_wordpiece_spacing_is_kept(text, chunks):
    tok = wordpiece_tokenizer()
    ids = tok.encode(text, add_special_tokens=True)
    assert "".join(stream(tok, ids, chunks, True)) == tok.decode(ids, skip_special_tokens=True)
