"""{% generation %} blocks: Tokenizer.assistant_tokens_mask equals transformers'
apply_chat_template(..., tokenize=True, return_dict=True, return_assistant_tokens_mask=True)."""

import threading

import pytest
from chat_templates import PHI3, PHI3_TRAINING, QWEN, QWEN3_TRAINING
from corpus_helpers import trained_tokenizer

from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.chat import ChatTemplate

# ChatML with the block around the reply and <|im_end|>, the '\n' after it outside
CHATML_GEN = ("{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
              "{{- '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{{ '\\n' }}{%- else %}"
              "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
              "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# blocks that start mid-token, render nothing, or sit in a macro (transformers' offsets for those are odd: equal anyway)
ODD = ("{% macro reply(m) %}{% generation %}{{ m.content }}{% endgeneration %}{% endmacro %}"
       "{% for m in messages %}{{ m.role }}:{% if m.role == 'assistant' %}{% generation %}{% endgeneration %}"
       "x{% generation %}{{ m.content[:3] }}{% endgeneration %}{{ m.content[3:] }}|{{ reply(m) }}"
       "{% else %}{{ m.content }}{% endif %}\n{% endfor %}")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another? 你好 🎉"},
        {"role": "assistant", "content": "\n\nEleven, 你好 🎉"}]
REASONING = [{"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "Four.", "reasoning_content": "Add them."},
             {"role": "user", "content": "And 3+3?"},
             {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\nSix."}]
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "18C and sunny."}]
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def base():
    return trained_tokenizer()


def pair(tmp_path, base, template, **tokens):
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    backend = Backend.from_str(base.backend.to_str())
    backend.add_special_tokens(SPECIALS)
    Tokenizer(backend, {**base.config, "chat_template": template, **tokens}).save(tmp_path)
    return Tokenizer.load(tmp_path), AutoTokenizer.from_pretrained(tmp_path)


CASES = [
    ("chatml-gen", CHATML_GEN, CHAT, {}),
    ("chatml-gen-prompt", CHATML_GEN, CHAT[:4], {"add_generation_prompt": True}),
    ("qwen3-training", QWEN3_TRAINING, CHAT, {}),
    ("qwen3-training-reasoning", QWEN3_TRAINING, REASONING, {}),
    ("qwen3-training-tools", QWEN3_TRAINING, TOOL_CHAT, {"tools": TOOLS}),
    ("phi3-training", PHI3_TRAINING, CHAT, {}),
    ("phi3-training-ends-with-user", PHI3_TRAINING, CHAT[:4], {}),
    ("odd-blocks", ODD, CHAT, {}),
    ("no-blocks", QWEN, CHAT, {}),
]


@pytest.mark.parametrize("template,messages,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_transformers(tmp_path, base, template, messages, kwargs):
    ours, hf = pair(tmp_path, base, template, eos_token="<|endoftext|>")
    ids, mask = ours.assistant_tokens_mask(messages, **kwargs)
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 **kwargs)
    assert ids == out["input_ids"]
    assert mask == out["assistant_masks"]
    assert ids == ours.apply_chat_template(messages, tokenize=True, **kwargs)  # the same text, encoded whole
    assert ours.chat_template_has_generation() == (template is not QWEN) == any(mask)


def test_spans_are_the_blocks_output(base):
    template = ChatTemplate(CHATML_GEN)
    text, spans = template.render_with_generation_spans(CHAT)
    assert text == template.render(CHAT)
    assert [text[a:b] for a, b in spans] == ["Seven.<|im_end|>", "\n\nEleven, 你好 🎉<|im_end|>"]
    assert ChatTemplate(QWEN).render_with_generation_spans(CHAT)[1] == []
    assert not ChatTemplate(PHI3).has_generation_markers and ChatTemplate(PHI3_TRAINING).has_generation_markers


def test_tracking_is_per_thread(base):
    """A server renders from several threads with one compiled template: spans never mix."""
    template = ChatTemplate(CHATML_GEN)
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"reply {i} " * (i % 7)}]
             for i in range(40)]
    expected = [template.render_with_generation_spans(c) for c in chats]
    results, barrier = [None] * len(chats), threading.Barrier(8)

    def work(k):
        barrier.wait()
        for _ in range(20):
            for i in range(k, len(chats), 8):
                results[i] = template.render_with_generation_spans(chats[i])
                template.render(chats[i])  # an untracked render in between records nothing

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
