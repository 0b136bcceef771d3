"""Chat-template rendering is bounded: hostile templates fail fast with TokenizerError, real ones are unchanged."""

import threading
import time

import pytest
from chat_templates import LLAMA3, MISTRAL, NAMESPACE, PHI3, QWEN, QWEN3, ZEPHYR

from lmstack.errors import TokenizerError
from lmstack.tokenizer.chat import CHATML_TEMPLATE, ChatTemplate

MSGS = [{"role": "user", "content": "hi"}]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! 你好"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What's 2+2?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
FAST = 5.0  # seconds: generous for a loaded machine; the unbounded versions run for minutes or exhaust memory

ATTACKS = {
    "str-repetition": ("{{ 'a' * (10**8 * 5) }}", "repetition"),
    "nested-ranges": ("{% for i in range(100000) %}{% for j in range(800) %}{% endfor %}{% endfor %}", "range()"),
    "nested-string-loops": ("{% for i in 'a'*1000000 %}{% for j in 'a'*1000000 %}{% endfor %}{% endfor %}",
                            "iterations"),
    "macro-recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
    "range-length": ("{{ range(10**9)|length }}", "Range too big"),
    "format-huge-int": ("{{ '%s' % (10**5000) }}", "integer"),
    "pow-constant": ("{{ 7**(3*10**6) }}", "**"),
    "int-squaring": ("{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}"
                     "{% endfor %}", "bits"),
    "huge-literal": ("{{ " + "9" * 5000 + " }}", "compiled"),
    "deep-nesting": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "compiled"),
    "tilde-doubling": ("{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}", "1,000,000"),
    "plus-doubling": ("{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "1,000,000"),
    "list-doubling": ("{% set ns = namespace(s=[1]) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "1,000,000"),
    "macro-doubling": ("{% macro d(s) %}{{ s }}{{ s }}{% endmacro %}{% set ns = namespace(s='a') %}"
                       "{% for i in range(60) %}{% set ns.s = d(ns.s) %}{% endfor %}", "1,000,000"),
    "center-filter": ("{{ 'a'|center(1000000000) }}", "center"),
    "ljust-method": ("{{ 'a'.ljust(1000000000) }}", "ljust"),
    "str-format-width": ("{{ '{:>1000000000}'.format(1) }}", "width"),
    "percent-width": ("{{ '%01000000000d' % 1 }}", "width"),
    "format-filter-width": ("{{ '%01000000000d'|format(1) }}", "width"),
    "replace-blowup": ("{{ ('a'*1000000).replace('a', 'b'*1000000) }}", "replace"),
    "join-blowup": ("{{ ('a'*1000000).join('b'*1000000) }}", "join"),
    "indent-blowup": ("{{ ('\\n'*999999)|indent(999999, true) }}", "indent"),
    "long-output": ("{% for i in range(1000) %}{% for j in range(500) %}{{ 'abcdefghij' }}{% endfor %}"
                    "{% endfor %}", "4,000,000"),
}


@pytest.mark.parametrize("source,message", list(ATTACKS.values()), ids=list(ATTACKS))
def test_costly_templates_are_refused_fast(source, message):
    start = time.monotonic()
    with pytest.raises(TokenizerError) as err:
        ChatTemplate(source, name="request chat_template").render(MSGS)
    assert time.monotonic() - start < FAST
    assert "request chat_template" in str(err.value)
    assert message in str(err.value)


def test_generation_span_render_is_bounded_too():
    with pytest.raises(TokenizerError, match="range"):
        ChatTemplate("{% generation %}{% for i in range(100000) %}{% for j in range(800) %}{% endfor %}"
                     "{% endfor %}{% endgeneration %}").render_with_generation_spans(MSGS)


def test_budget_is_per_render():
    # each render may use (almost) the whole budget; it does not accumulate across renders
    template = ChatTemplate("{% for i in range(90000) %}{% endfor %}{% for i in range(9) %}"
                            "{% for j in range(90000) %}{% endfor %}{% endfor %}ok")
    for _ in range(3):
        assert template.render(MSGS) == "ok"


def test_budget_is_per_thread():
    template = ChatTemplate("{% for i in range(9) %}{% for j in range(100000) %}{% endfor %}{% endfor %}ok")
    results, errors = [], []

    def work():
        try:
            results.append(template.render(MSGS))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == ["ok"] * 4


def test_legitimate_operators_still_work():
    source = ("{{ '-' * 3 }}|{{ 2 ** 10 }}|{{ '%s=%d' % ('a', 5) }}|{{ 'a' + 'b' }}|{{ [1] + [2] }}|{{ 7 % 3 }}|"
              "{{ 'x' ~ 1 }}|{{ 'ab'|center(6) }}|{{ '{}!'.format('hi') }}|{{ 'a,b'.split(',')|join('+') }}|"
              "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ m.role }}{% endfor %}")
    assert ChatTemplate(source).render(CHAT) == "---|1024|a=5|ab|[1, 2]|1|x1|  ab  |hi!|a+b|1/4system2/4user3/4assistant4/4user"


@pytest.mark.parametrize("template,messages,tools", [
    (QWEN, CHAT, None), (QWEN, CHAT, TOOLS), (QWEN3, CHAT, TOOLS), (LLAMA3, CHAT, TOOLS),
    (MISTRAL, CHAT[1:], None), (ZEPHYR, CHAT, None), (NAMESPACE, CHAT, None), (PHI3, CHAT, None),
    (CHATML_TEMPLATE, CHAT, None),
], ids=["qwen", "qwen-tools", "qwen3-tools", "llama3-tools", "mistral", "zephyr", "namespace", "phi3", "chatml"])
def test_published_templates_render_as_transformers(template, messages, tools):
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    for gen in (False, True):
        ours = ChatTemplate(template).render(messages, add_generation_prompt=gen, tools=tools,
                                             bos_token="<s>", eos_token="</s>")
        theirs = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=gen,
                                       bos_token="<s>", eos_token="</s>")[0][0]
        assert ours == theirs
