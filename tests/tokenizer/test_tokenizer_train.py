"""Training, round trips and files: our tokenizer against transformers and the stdlib corpus."""

import json

import pytest
from corpus_helpers import CJK_TEXT, bert_style_dir, stdlib_files, stdlib_texts, trained_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.errors import TokenizerError
from lmstack.tokenizer import Tokenizer


def test_trained_vocab_layout_and_special_tokens():
    tok = trained_tokenizer()
    assert tok.vocab_size == 1000 + 5
    assert tok.bos_token_id == 1000 and tok.eos_token_id == 1001 and tok.pad_token_id == 1002
    assert tok.token_to_id("<|im_start|>") == 1003 and tok.all_special_ids == [1000, 1001, 1002, 1003, 1004]
    ids = tok.encode("def f(x):\n    return x <|eos|>")
    assert ids[-1] == tok.eos_token_id  # special tokens in text map to their id
    assert tok.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x "
    # merges learned: the stdlib compresses well below one token per byte
    text = stdlib_texts(60)[50]
    assert len(tok.encode(text)) < 0.5 * len(text.encode())


def test_byte_level_256_is_pure_bytes():
    tok = Tokenizer.train(["hello hello hello world"] * 10, 256, special_tokens=["<|eos|>"], bos_token=None,
                          pad_token=None)
    assert tok.vocab_size == 257 and tok.eos_token_id == 256
    text = "héllo 你好"
    assert len(tok.encode(text)) == len(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


def test_train_on_files(tmp_path):
    from pathlib import Path
    tok = Tokenizer.train([Path(p) for p in stdlib_files(8)], 600)  # tokenizers reads files line by line
    sample = stdlib_texts(8)[0][:2000]
    assert tok.vocab_size == 605 and tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(sample)) < 0.6 * len(sample)
    with pytest.raises(TokenizerError, match="missing.txt does not exist"):
        Tokenizer.train([tmp_path / "missing.txt"], 300)


def test_train_rejects_bad_options():
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        Tokenizer.train(["abc"], 100)
    with pytest.raises(TokenizerError, match="not a single string"):
        Tokenizer.train("some text", 300)
    with pytest.raises(TokenizerError, match="training text 1 is int"):
        Tokenizer.train(["abc", 3], 300)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_random_unicode(text):
    tok = trained_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_stdlib_and_cjk():
    tok = trained_tokenizer()
    texts = list(stdlib_texts(60)[40:60]) + [CJK_TEXT]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text


def test_hf_loads_ours_and_encodes_identically(tmp_path):
    from transformers import AutoTokenizer

    tok = trained_tokenizer()
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|eos|>" and config["model_max_length"] == 2048 and "chat_template" in config
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                   tok.pad_token_id)
    texts = list(stdlib_texts(50)[40:50]) + [CJK_TEXT, "<|bos|>a<|eos|> b<|pad|>", "  spaces\t\n\n x"]
    for text in texts:
        ours = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ours
        assert hf.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
        assert hf.decode(ours) == tok.decode(ours) == text
        assert hf.decode(ours, skip_special_tokens=True) == tok.decode(ours, skip_special_tokens=True)


def test_add_bos_token_matches_hf(tmp_path):
    from transformers import AutoTokenizer

    tok = Tokenizer.train(list(stdlib_texts(5)), 400, add_bos_token=True)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode("import os", add_special_tokens=True)
    assert ids[0] == tok.bos_token_id and hf.encode("import os") == ids


def test_we_load_hf_saved_files_and_resave(tmp_path):
    from transformers import AutoTokenizer

    tok = trained_tokenizer()
    tok.save(tmp_path / "ours")
    hf = AutoTokenizer.from_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "theirs")  # transformers 5 writes chat_template.jinja beside the config
    back = Tokenizer.load(tmp_path / "theirs")
    assert back.chat_template == tok.chat_template and back.eos_token_id == tok.eos_token_id
    assert back.fingerprint == Tokenizer.load(tmp_path / "ours").fingerprint
    back.save(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert "is_local" not in config and config["chat_template"] == tok.chat_template


def test_wordpiece_tokenizer_json_loads_and_encodes_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = bert_style_dir(tmp_path)
    assert json.loads((path / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    ours = Tokenizer.load(path)
    hf = AutoTokenizer.from_pretrained(path)
    texts = ["Hello, World! It's a café.", "def f(x): return x ** 2", "Naïve RÉSUMÉ 東京", CJK_TEXT,
             stdlib_texts(30)[25][:500]]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == hf(text)["input_ids"]
        assert ids[0] == ours.special_id("cls") and ids[-1] == ours.special_id("sep")
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode_batch(texts, add_special_tokens=True) == hf(texts)["input_ids"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json is not a valid"):
        Tokenizer.load(tmp_path)
    trained_tokenizer().save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.load(tmp_path)
