"""Chat templates render exactly as transformers' apply_chat_template, inside a sandbox."""

import copy

import pytest
from chat_templates import LLAMA3, MISTRAL, NAMESPACE, QWEN, ZEPHYR
from corpus_helpers import trained_tokenizer

from lmstack.errors import TokenizerError
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.chat import CHATML_TEMPLATE

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CHAT = [
    {"role": "system", "content": "You are terse. <b>&</b>"},
    {"role": "user", "content": "Hi there! 你好 🎉"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "  What's 2+2?  "},
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18C, sunny"},
    {"role": "tool", "content": "(cached)"},
    {"role": "assistant", "content": "It is 18C and sunny in Paris."},
]
ALTERNATING = [m for m in CHAT if m["role"] != "system"][:3]


def with_template(tmp_path, template):
    tok = Tokenizer(trained_tokenizer().backend, {**trained_tokenizer().config, "chat_template": template})
    tok.save(tmp_path)
    return Tokenizer.load(tmp_path)


def hf_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("template,messages,tools", [
    (QWEN, CHAT, None), (QWEN, TOOL_CHAT, TOOLS), (QWEN, CHAT, TOOLS),
    (LLAMA3, CHAT, None), (LLAMA3, CHAT, TOOLS),
    (MISTRAL, ALTERNATING, None), (ZEPHYR, CHAT, None), (NAMESPACE, CHAT, None), (None, CHAT, None),
], ids=["qwen", "qwen-toolcalls", "qwen-tools", "llama3", "llama3-tools", "mistral", "zephyr", "namespace",
        "chatml-default"])
def test_matches_transformers(tmp_path, template, messages, tools):
    ours = with_template(tmp_path, template)
    hf = hf_tokenizer(tmp_path)
    if template is None:
        assert ours.chat_template is None
        hf.chat_template = CHATML_TEMPLATE
    before = copy.deepcopy(messages)
    for gen in (False, True):
        text = ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=False)
        ids = ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=True)
        assert ids == hf.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=True,
                                             return_dict=False)
    assert messages == before  # the caller's messages are not modified
    assert len(text) > 40


def test_extra_variables_reach_the_template(tmp_path):
    ours = with_template(tmp_path, LLAMA3)
    hf = hf_tokenizer(tmp_path)
    text = ours.apply_chat_template(CHAT, date_string="01 Jan 2030")
    assert "Today Date: 01 Jan 2030" in text and text.startswith("<|bos|>")
    assert text == hf.apply_chat_template(CHAT, date_string="01 Jan 2030", tokenize=False)


def test_default_chatml_when_model_has_none():
    tok = Tokenizer(trained_tokenizer().backend, {"eos_token": "<|eos|>"})
    assert tok.chat_template is None
    text = tok.apply_chat_template(ALTERNATING[:1], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi there! 你好 🎉<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(ALTERNATING[:1], tokenize=True)
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_raise_exception_becomes_tokenizer_error():
    tok = Tokenizer(trained_tokenizer().backend, {"chat_template": MISTRAL, "bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tok.apply_chat_template(CHAT[1:3] + CHAT[2:3])
    with pytest.raises(TokenizerError, match="Only user and assistant roles"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{% set ns = namespace(__class__=1) %}",
    "{{ messages.append(1) }}",
])
def test_sandbox_blocks_python_internals(attack):
    tok = Tokenizer(trained_tokenizer().backend, {"chat_template": attack})
    with pytest.raises(TokenizerError, match="Python internals"):
        tok.apply_chat_template(CHAT)


def test_bad_templates_and_messages():
    tok = Tokenizer(trained_tokenizer().backend, {"chat_template": "{% for m in messages %}{{ m.role }"})
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        tok.apply_chat_template(CHAT)
    tok = Tokenizer(trained_tokenizer().backend, {})
    with pytest.raises(TokenizerError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(TokenizerError, match="chat message 1 is str"):
        tok.apply_chat_template([CHAT[0], "hello"])


def test_named_templates_pick_tool_use(tmp_path):
    config = {"chat_template": [{"name": "default", "template": "D{{ messages|length }}"},
                                {"name": "tool_use", "template": "T{{ tools|length if tools else 0 }}"}]}
    tok = Tokenizer(trained_tokenizer().backend, config)
    assert tok.apply_chat_template(CHAT) == "D4"
    assert tok.apply_chat_template(CHAT, tools=TOOLS) == "T1"
    assert tok.apply_chat_template(CHAT, chat_template="tool_use") == "T0"
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).apply_chat_template(CHAT, tools=TOOLS) == "T1"


def test_per_call_templates_render_and_stay_a_bounded_cache(tmp_path):
    from lmstack.tokenizer.tokenizer import MAX_COMPILED_TEMPLATES

    tok = with_template(tmp_path, ZEPHYR)
    hf = hf_tokenizer(tmp_path)
    for i in range(MAX_COMPILED_TEMPLATES + 5):  # a server meets a new template in each request
        template = f"{{% for m in messages %}}[{i}:{{{{ m['role'] }}}}]{{{{ m['content'] }}}}{{% endfor %}}"
        assert tok.apply_chat_template(ALTERNATING, chat_template=template) == \
            hf.apply_chat_template(ALTERNATING, chat_template=template, tokenize=False)
        assert len(tok._templates) <= MAX_COMPILED_TEMPLATES
    assert tok.apply_chat_template(ALTERNATING) == hf.apply_chat_template(ALTERNATING, tokenize=False)
