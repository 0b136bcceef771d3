"""special_tokens_map.json against tokenizer_config.json: the precedence transformers applies at load."""

import json

import pytest
from corpus_helpers import trained_tokenizer

from lmstack.errors import TokenizerError
from lmstack.tokenizer import Tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}"
            "{{ pad_token | default('no pad') }}")
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


@pytest.fixture()
def tok_dir(tmp_path):
    base = trained_tokenizer()
    Tokenizer(base.backend, {**base.config, "chat_template": TEMPLATE, "bos_token": "<|bos|>",
                             "eos_token": "<|eos|>", "pad_token": "<|pad|>"}).save(tmp_path)
    return tmp_path


def write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")


def edit_config(tok_dir, **changes):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config.update(changes)
    write(tok_dir / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})


def assert_same_as_transformers(tok_dir):
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(tok_dir), Tokenizer.load(tok_dir)
    for role in ("bos", "eos", "pad", "unk"):
        assert ours.special_token(role) == getattr(hf, f"{role}_token"), role
        assert ours.special_id(role) == getattr(hf, f"{role}_token_id"), role
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.apply_chat_template(CHAT) == hf.apply_chat_template(CHAT, tokenize=False)
    return ours


def test_map_overrides_a_legacy_config(tok_dir):
    """No added_tokens_decoder in the config: transformers lets special_tokens_map.json win."""
    write(tok_dir / "special_tokens_map.json", {"eos_token": "<|im_end|>",
                                                "bos_token": {"content": "<|im_start|>", "special": True},
                                                "additional_special_tokens": ["<|im_end|>"]})
    ours = assert_same_as_transformers(tok_dir)
    assert ours.special_token("eos") == "<|im_end|>" and ours.special_token("bos") == "<|im_start|>"
    assert ours.apply_chat_template(CHAT) == "<|im_start|>user: Hi<|im_end|>assistant: Yo<|im_end|><|pad|>"


def test_map_null_removes_the_token(tok_dir):
    write(tok_dir / "special_tokens_map.json", {"pad_token": None})
    assert assert_same_as_transformers(tok_dir).pad_token_id is None


def test_map_fills_tokens_the_config_lacks(tok_dir):
    edit_config(tok_dir, eos_token=None)
    write(tok_dir / "special_tokens_map.json", {"eos_token": "<|im_end|>"})
    assert assert_same_as_transformers(tok_dir).special_token("eos") == "<|im_end|>"


def test_config_with_added_tokens_decoder_ignores_the_map(tok_dir):
    """A config with added_tokens_decoder is current: transformers does not read the map at all."""
    specials = trained_tokenizer().backend.get_added_tokens_decoder()
    edit_config(tok_dir, added_tokens_decoder={str(i): {"content": t.content, "special": t.special, "lstrip": False,
                                                        "rstrip": False, "normalized": False, "single_word": False}
                                               for i, t in specials.items()})
    write(tok_dir / "special_tokens_map.json", {"eos_token": "<|im_end|>", "unk_token": "<|im_start|>"})
    ours = assert_same_as_transformers(tok_dir)
    assert ours.special_token("eos") == "<|eos|>" and ours.special_token("unk") is None
    write(tok_dir / "special_tokens_map.json", {"eos_token": {"content": None}})  # never read, so never refused
    assert Tokenizer.load(tok_dir).special_token("eos") == "<|eos|>"


def test_a_bad_map_that_is_read_is_refused(tok_dir):
    write(tok_dir / "special_tokens_map.json", {"eos_token": 5})
    with pytest.raises(TokenizerError, match=r"special_tokens_map.json: eos_token is int 5"):
        Tokenizer.load(tok_dir)


def test_save_removes_a_stale_map(tok_dir):
    """Saved tokens must load back: a map left in the directory would override the saved config."""
    write(tok_dir / "special_tokens_map.json", {"eos_token": "<|im_end|>"})
    tok = Tokenizer.load(tok_dir)
    tok.config["eos_token"] = "<|eos|>"
    tok.save(tok_dir)
    assert not (tok_dir / "special_tokens_map.json").exists()
    assert assert_same_as_transformers(tok_dir).special_token("eos") == "<|eos|>"
