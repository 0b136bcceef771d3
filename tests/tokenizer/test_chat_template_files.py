"""Which file a chat template comes from when a directory has several: the same one as transformers."""

import json

import pytest
import transformers
from corpus_helpers import trained_tokenizer

from lmstack.tokenizer import Tokenizer

MSGS = [{"role": "user", "content": "hi"}]
CONFIG = "CONFIG:{% for m in messages %}{{ m.content }}{% endfor %}"
JINJA = "JINJA:{% for m in messages %}{{ m.content }}{% endfor %}"
EXTRA = "EXTRA:{% for m in messages %}{{ m.content }}{% endfor %}"


def _theirs(directory, name=None):
    return transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(
        MSGS, tokenize=False, chat_template=name)


@pytest.fixture
def both(tmp_path):
    tok = Tokenizer(trained_tokenizer().backend, {**trained_tokenizer().config, "chat_template": CONFIG})
    tok.save(tmp_path)  # a new Tokenizer: trained_tokenizer() is a shared, cached instance
    (tmp_path / "chat_template.jinja").write_text(JINJA)
    return tmp_path


def test_jinja_file_wins_over_tokenizer_config_as_in_transformers(both):
    assert _theirs(both) == "JINJA:hi"
    assert Tokenizer.load(both).apply_chat_template(MSGS) == _theirs(both)


def test_additional_templates_replace_the_config_template_as_in_transformers(both):
    (both / "additional_chat_templates").mkdir()
    (both / "additional_chat_templates" / "tool_use.jinja").write_text(EXTRA)
    ours = Tokenizer.load(both)
    for name in (None, "tool_use"):
        assert ours.apply_chat_template(MSGS, chat_template=name) == _theirs(both, name)
    assert ours.apply_chat_template(MSGS, chat_template="tool_use") == "EXTRA:hi"


def test_save_leaves_no_stale_jinja_that_would_override_the_saved_template(both):
    tok = Tokenizer.load(both)
    tok.config["chat_template"] = CONFIG.replace("CONFIG", "NEW")
    (both / "additional_chat_templates").mkdir()
    (both / "additional_chat_templates" / "tool_use.jinja").write_text(EXTRA)
    tok.save(both)
    assert not (both / "chat_template.jinja").exists()
    assert not list((both / "additional_chat_templates").glob("*.jinja"))
    assert json.loads((both / "tokenizer_config.json").read_text())["chat_template"].startswith("NEW:")
    assert Tokenizer.load(both).apply_chat_template(MSGS) == _theirs(both) == "NEW:hi"
