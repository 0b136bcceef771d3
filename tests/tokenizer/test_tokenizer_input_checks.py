"""Bad tokenizer files and `tokenizer train` options give one clear TokenizerError/ConfigError, never a traceback."""

import json
from pathlib import Path

import pytest
from corpus_helpers import trained_tokenizer

from lmstack.cli import main
from lmstack.errors import TokenizerError
from lmstack.tokenizer import Tokenizer

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def tok_dir(tmp_path):
    path = tmp_path / "tok"
    trained_tokenizer().save(path)
    return path


def set_config(path, **fields):
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(fields)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("chat_template", [{"template": "x"}], r"chat_template\[0\] is dict .*\"name\""),
    ("chat_template", [{"name": "default", "template": 3}], r"chat_template\[0\] is dict"),
    ("chat_template", ["{{ x }}"], r"chat_template\[0\] is str"),
    ("chat_template", 5, r"chat_template is int 5; it must be a Jinja template string"),
    ("eos_token", {"content": 5}, r"eos_token is dict \{\"content\": 5\}; a special token must be a string"),
    ("bos_token", 7, r"bos_token is int 7; a special token must be a string"),
    ("pad_token", ["<|pad|>"], r"pad_token is list"),
])
def test_bad_tokenizer_config_fields_are_refused_at_load(tok_dir, field, value, message):
    set_config(tok_dir, **{field: value})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: " + message):
        Tokenizer.load(tok_dir)


def test_good_shapes_still_load(tok_dir):
    set_config(tok_dir, eos_token={"content": "<|eos|>", "special": True},
               chat_template=[{"name": "default", "template": "D{{ messages|length }}"},
                              {"name": "tool_use", "template": "T"}])
    tok = Tokenizer.load(tok_dir)
    assert tok.eos_token_id == trained_tokenizer().eos_token_id and tok.apply_chat_template(CHAT) == "D1"


def test_special_tokens_map_is_checked(tok_dir):
    (tok_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": None}}))
    with pytest.raises(TokenizerError, match=r"special_tokens_map.json: eos_token is dict"):
        Tokenizer.load(tok_dir)


def test_template_syntax_errors_name_the_file(tok_dir):
    set_config(tok_dir, chat_template="{% for m in messages %}{{ m.role }")
    with pytest.raises(TokenizerError, match=r"chat template in .*tokenizer_config.json is not valid Jinja "
                                             r"\(line 1: .*\); fix the template"):
        Tokenizer.load(tok_dir)
    set_config(tok_dir, chat_template=[{"name": "default", "template": "ok"}, {"name": "tool_use", "template": "{{"}])
    with pytest.raises(TokenizerError, match=r"chat template 'tool_use' in .*tokenizer_config.json is not valid"):
        Tokenizer.load(tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (tok_dir / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(TokenizerError, match=r"chat template in .*chat_template.jinja is not valid Jinja"):
        Tokenizer.load(tok_dir)
    (tok_dir / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(TokenizerError, match=r"chat_template.jinja is not UTF-8 text .* re-save it as UTF-8"):
        Tokenizer.load(tok_dir)


def test_in_memory_bad_templates_are_tokenizer_errors():
    tok = Tokenizer(trained_tokenizer().backend, {"chat_template": [{"template": "x"}]})
    with pytest.raises(TokenizerError, match="must hold .*'name': str, 'template': str"):
        tok.apply_chat_template(CHAT)
    tok = Tokenizer(trained_tokenizer().backend, {"chat_template": 5})
    with pytest.raises(TokenizerError, match="chat template is int, expected a Jinja template string"):
        tok.apply_chat_template(CHAT)


def test_train_refuses_empty_corpus_and_bad_model_max_length(tmp_path):
    with pytest.raises(TokenizerError, match="training corpus is empty"):
        Tokenizer.train(["", ""], 300)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.txt are empty"):
        Tokenizer.train([Path(empty)], 300)
    for bad in (0, -5):
        with pytest.raises(TokenizerError, match=f"model_max_length={bad} must be a positive"):
            Tokenizer.train(["abc abc"], 300, model_max_length=bad)


def test_save_to_a_file_is_refused(tmp_path):
    target = tmp_path / "corpus.txt"
    target.write_text("keep me")
    with pytest.raises(TokenizerError, match="corpus.txt: it is a file; give a directory"):
        trained_tokenizer().save(target)
    assert target.read_text() == "keep me"


def cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_tokenizer_train_input_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty.txt").write_bytes(b"")
    code, _, err = cli(capsys, "tokenizer", "train", "--input", "empty.txt", "--out", "t2")
    assert code == 2 and "the corpus is empty" in err and not Path("t2").exists()

    Path("corpus.txt").write_text("hello world " * 50)
    code, _, err = cli(capsys, "tokenizer", "train", "--input", "corpus.txt", "--out", "corpus.txt")
    assert code == 2 and "--out corpus.txt is a file; give a directory" in err and "Traceback" not in err
    assert Path("corpus.txt").read_text() == "hello world " * 50
    code, _, err = cli(capsys, "tokenizer", "train", "--input", "corpus.txt", "--out", "corpus.txt/sub")
    assert code == 2 and "--out corpus.txt/sub is inside corpus.txt, which is a file" in err

    code, _, err = cli(capsys, "tokenizer", "train", "--input", "corpus.txt", "--out", "t3", "--model_max_length", "0")
    assert code == 2 and "--model-max-length 0 must be a positive number" in err and not Path("t3").exists()


def test_cli_tokenizer_train_reports_the_real_learned_vocabulary(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("small.txt").write_text("alpha beta gamma delta " * 40)
    code, out, _ = cli(capsys, "tokenizer", "train", "--input", "small.txt", "--out", "t", "--vocab-size", "5000")
    tok = Tokenizer.load("t")
    learned = tok.backend.get_vocab_size(with_added_tokens=False)
    assert code == 0 and 256 < learned < 5000
    assert f"vocab {tok.vocab_size} ({learned} learned + special tokens)" in out and "5000 learned" not in out
    assert (f"warning: learned only {learned} of the requested --vocab-size 5000 tokens "
            f"(256 bytes + {learned - 256} merges)") in out
