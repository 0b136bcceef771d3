"""continue_final_message: the text ends right after the final message, exactly as transformers renders it,
through Tokenizer.apply_chat_template and the server's render_chat."""

import copy
from types import SimpleNamespace

import pytest
from chat_templates import LLAMA3, MISTRAL_V3, QWEN, QWEN3
from corpus_helpers import trained_tokenizer

from lmstack.errors import TokenizerError
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.chat import CHATML_TEMPLATE

U = {"role": "user", "content": "Hi there! 你好"}
S = {"role": "system", "content": "Be brief."}
PARTS = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
         "{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% else %}<image>{% endif %}{% endfor %}"
         "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER_ONLY = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}\n{% endif %}{% endfor %}"


@pytest.fixture(scope="module")
def base():
    return trained_tokenizer()


def pair(tmp_path, base, template, specials=("<s>", "</s>", "[INST]", "[/INST]"), **tokens):
    """(lmstack Tokenizer, transformers tokenizer) over the same saved directory."""
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    backend = Backend.from_str(base.backend.to_str())
    backend.add_special_tokens(list(specials))
    config = {**base.config, **tokens}
    if template is not None:
        config["chat_template"] = template
    else:
        config.pop("chat_template", None)
    Tokenizer(backend, config).save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    if template is None:
        hf.chat_template = CHATML_TEMPLATE
    return Tokenizer.load(tmp_path), hf


CASES = [
    ("qwen2.5-trailing-space", QWEN, [S, U, {"role": "assistant", "content": "The answer is "}], True),
    ("qwen2.5-short-prefill", QWEN, [U, {"role": "assistant", "content": "end"}], True),  # 'end' is in <|im_end|>
    ("qwen2.5-no-space", QWEN, [U, {"role": "assistant", "content": "The answer is"}], True),
    ("chatml-default", None, [U, {"role": "assistant", "content": "Sure, "}], True),
    ("llama3-trims", LLAMA3, [U, {"role": "assistant", "content": "The answer is  "}], True),
    ("mistral-v0.3-trims", MISTRAL_V3, [U, {"role": "assistant", "content": "The weather is "}], True),
    ("content-parts", PARTS, [U, {"role": "assistant", "content": [
        {"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "a cat "}]}], True),
    ("qwen3-reasoning", QWEN3, [U, {"role": "assistant", "content": "", "reasoning_content": "Let me think"}],
     "reasoning_content"),
    ("qwen3-content", QWEN3, [U, {"role": "assistant", "content": "The answer is "}], True),
    ("continue-a-user-message", QWEN, [U], True),
]


@pytest.mark.parametrize("template,messages,cont", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_transformers(tmp_path, base, template, messages, cont):
    ours, hf = pair(tmp_path, base, template, bos_token="<s>", eos_token="</s>")
    before = copy.deepcopy(messages)
    text = ours.apply_chat_template(messages, continue_final_message=cont)
    assert text == hf.apply_chat_template(messages, continue_final_message=cont, tokenize=False)
    assert ours.apply_chat_template(messages, continue_final_message=cont, tokenize=True) == list(
        hf.apply_chat_template(messages, continue_final_message=cont, tokenize=True, return_dict=False))
    assert messages == before  # the tag went into a copy
    assert "CONTINUE_FINAL_MESSAGE_TAG" not in text
    # without it the final message is closed as usual (the flag is not a template variable any more)
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False) != text


def test_trailing_space_is_kept_or_trimmed_as_the_template_does(tmp_path, base):
    ours, _ = pair(tmp_path, base, QWEN)
    reply = [U, {"role": "assistant", "content": "The answer is "}]
    assert ours.apply_chat_template(reply, continue_final_message=True).endswith("<|im_start|>assistant\nThe answer is ")
    ours, _ = pair(tmp_path / "llama", base, LLAMA3, bos_token="<s>")
    assert ours.apply_chat_template(reply, continue_final_message=True).endswith("\n\nThe answer is")


@pytest.mark.parametrize("template,messages,kwargs,match", [
    (QWEN, [U, {"role": "assistant", "content": "Hi"}], {"add_generation_prompt": True}, "cannot be combined"),
    (USER_ONLY, [U, {"role": "assistant", "content": "Hi"}], {}, "does not appear in the text"),
    (QWEN, [U, {"role": "assistant", "content": None, "tool_calls": []}], {}, 'has no "content" to continue'),
    (QWEN, [U, {"role": "assistant", "content": "Hi", "reasoning_content": "hmm"}],
     {"continue_final_message": "reasoning_content"}, "never reads that field"),
    (PARTS, [U, {"role": "assistant", "content": [{"type": "image"}]}], {}, "no text part"),
], ids=["with-generation-prompt", "template-drops-it", "no-content", "field-not-in-template", "no-text-part"])
def test_refused_where_transformers_refuses(tmp_path, base, template, messages, kwargs, match):
    ours, hf = pair(tmp_path, base, template)
    kwargs = {"continue_final_message": True, **kwargs}
    with pytest.raises(ValueError):
        hf.apply_chat_template(messages, tokenize=False, **kwargs)
    with pytest.raises(TokenizerError, match=match):
        ours.apply_chat_template(messages, **kwargs)


# ---- the server: render_chat uses the tokenizer's implementation ------------------------------
def server_prompt(tokenizer, body):
    from lmstack.serve.chat import render_chat
    from lmstack.serve.protocol import ChatCompletionRequest

    state = SimpleNamespace(tokenizer=tokenizer, config=SimpleNamespace(trust_request_chat_template=False))
    req = ChatCompletionRequest(**body)
    return render_chat(state, req.messages, add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=req.continue_final_message, tools=req.tools,
                       template_kwargs=req.chat_template_kwargs, chat_template=req.chat_template)


@pytest.mark.parametrize("content", ["The answer is ", "end", "<|im_end", "  two spaces  "])
@pytest.mark.parametrize("template", [QWEN, LLAMA3, None], ids=["qwen2.5", "llama3", "chatml"])
def test_server_prompt_matches_transformers(tmp_path, base, template, content):
    ours, hf = pair(tmp_path, base, template, bos_token="<s>")
    messages = [U, {"role": "assistant", "content": content}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    assert server_prompt(ours, body) == hf.apply_chat_template(messages, continue_final_message=True,
                                                               tokenize=False)


@pytest.mark.parametrize("messages,template,kwargs,param", [
    ([U], QWEN, None, "messages"),  # the final message is not the assistant's
    ([U, {"role": "assistant", "content": "   "}], QWEN, None, "messages"),
    ([U, {"role": "assistant", "content": None}], QWEN, None, "messages"),
    ([U, {"role": "assistant", "content": "Hi"}], USER_ONLY, None, "messages"),  # the template drops it
    ([U, {"role": "assistant", "content": "Hi"}], QWEN, {"continue_final_message": True}, "chat_template_kwargs"),
], ids=["user-last", "blank", "null", "dropped", "as-template-kwarg"])
def test_server_refuses_with_400(tmp_path, base, messages, template, kwargs, param):
    from lmstack.serve.errors import APIError

    ours, _ = pair(tmp_path, base, template)
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True,
            "chat_template_kwargs": kwargs}
    with pytest.raises(APIError) as err:
        server_prompt(ours, body)
    assert err.value.status == 400 and err.value.param == param
