"""A request's own `chat_template` (vLLM's field): refused unless the server trusts request
templates, and then rendered exactly (token ids compared with `tokenizers` on the expected text)."""

import httpx
import pytest
from serve_helpers import LiveServer, api_error

from lmstack.serve import ServeConfig, create_app

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
EXPECTED = "<system>Be brief.<user>Hi there>"


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": TEMPLATE, "max_tokens": 1}),
    ("/tokenize", {"messages": CHAT, "chat_template": TEMPLATE}),
])
def test_request_templates_are_refused_unless_trusted(http, path, body):
    err = api_error(http.post(path, json=body), 400)
    assert err["param"] == "chat_template", err
    assert "does not run templates from requests" in err["message"]
    assert "--trust_request_chat_template true" in err["message"]


@pytest.fixture(scope="module")
def trusting(engine):
    app = create_app(engine, config=ServeConfig(model_names=["tiny"], trust_request_chat_template=True))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def test_a_trusted_request_template_is_what_the_prompt_is_rendered_with(trusting, hf_reference):
    _, reference_tokenizer = hf_reference
    expected = reference_tokenizer.encode(EXPECTED, add_special_tokens=False).ids
    r = trusting.post("/tokenize", json={"messages": CHAT, "chat_template": TEMPLATE})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == expected
    r = trusting.post("/v1/chat/completions", json={"messages": CHAT, "chat_template": TEMPLATE, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    default = trusting.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert default != expected  # without the field the model's own (ChatML) template is used


@pytest.mark.parametrize("template,needle", [
    ("{% for m in messages %}", "could not render"),  # a syntax error
    ("{{ ''.__class__.__mro__ }}", "unsafe"),  # the sandbox refuses Python internals
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
])
def test_a_broken_request_template_is_400_naming_the_field(trusting, template, needle):
    err = api_error(trusting.post("/v1/chat/completions", json={"messages": CHAT, "chat_template": template}), 400)
    assert err["param"] == "chat_template", err
    assert "the request's chat_template could not render these messages" in err["message"]
    assert needle in err["message"], err["message"]


def test_tokenize_refuses_a_template_without_messages(trusting):
    err = api_error(trusting.post("/tokenize", json={"prompt": "hello", "chat_template": TEMPLATE}), 400)
    assert err["param"] == "chat_template" and "chat_template applies to messages" in err["message"], err
