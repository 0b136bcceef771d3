"""The content filter: config errors, streaming hold-back (property-based), and end to end."""

import re

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_helpers import LiveServer, wait_idle

from lmstack.errors import ConfigError
from lmstack.serve import SafetyFilter, ServeConfig, create_app


def make(patterns=None, words=None, holdback=8, **extra):
    spec = {}
    if patterns:
        spec["patterns"] = patterns
    if words:
        spec["words"] = words
    return SafetyFilter.from_dict({"categories": {"weapons": spec}, "holdback_chars": holdback, **extra})


@pytest.mark.parametrize("data,message", [
    ({}, "non-empty 'categories'"),
    ({"categories": {"x": {"patterns": ["("]}}}, "category 'x' pattern '(' is not a valid regular expression"),
    ({"categories": {"x": {"words": "bomb"}}}, "category 'x' words must be a list"),
    ({"categories": {"x": {}}}, "category 'x' has no patterns or words"),
    ({"categories": {"x": {"pattern": ["a"]}}}, "unknown keys ['pattern']"),
    ({"categories": {"x": {"words": ["a"]}}, "holdback_chars": -1}, "holdback_chars=-1"),
    ({"categories": {"x": {"words": ["a"]}}, "check_output": "yes"}, "check_output='yes'"),
    ({"categories": {"x": {"words": ["a"]}}, "blocklist": []}, "unknown keys ['blocklist']"),
])
def test_config_errors_name_the_problem(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SafetyFilter.from_dict(data, source="safety.yaml")


def test_load_yaml_and_missing_file(tmp_path):
    path = tmp_path / "safety.yaml"
    path.write_text("categories:\n  weapons:\n    words: [nerve agent]\n    patterns: ['\\bbuild (a|an) bomb\\b']\n")
    f = SafetyFilter.load(path)
    assert f.find("how to Build a BOMB today", "input").category == "weapons"
    assert f.find("a nerve agent", "input") is not None and f.find("nerve agents", "input") is None
    assert f.check_input_texts(["hello", "all fine"]) is None
    with pytest.raises(ConfigError, match="does not exist"):
        SafetyFilter.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json could not be parsed"):
        SafetyFilter.load(tmp_path / "bad.json")


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(alphabet="abc xyz", max_size=30), suffix=st.text(alphabet="abc xyz", max_size=30),
       cuts=st.lists(st.integers(0, 80), max_size=12), blocked=st.booleans())
def test_streamed_output_never_shows_a_blocked_phrase(prefix, suffix, cuts, blocked):
    phrase = "nerve agent"
    text = prefix + (" " + phrase + " " if blocked else " ") + suffix
    guard = make(words=[phrase], holdback=len(phrase)).output_guard()
    shown, last = "", 0
    for cut in sorted(set(c for c in cuts if c < len(text))) + [len(text)]:
        shown += guard.feed(text[last:cut])
        last = cut
        assert phrase not in shown
    shown += guard.finish()
    match = re.search(r"(?<!\w)nerve agent(?!\w)", text)
    if match:
        assert guard.violation is not None and shown == text[:match.start()]
    else:
        assert guard.violation is None and shown == text


@pytest.fixture()
def filtered(engine, server, http):
    """A second server on the same engine whose filter blocks 3 characters the model really writes."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 30,
            "temperature": 0}
    reply = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    k = next(k for k in range(10, len(reply) - 3) if "\ufffd" not in reply[k:k + 3] and reply[k:k + 3].strip())
    blocked = reply[k:k + 3]
    safety = SafetyFilter.from_dict({"categories": {
        "test-output": {"patterns": [re.escape(blocked)]},
        "weapons": {"words": ["nerve agent"], "message": "Ask about something else."}}})
    with LiveServer(create_app(engine, config=ServeConfig(model_names=["tiny"], safety=safety))) as live:
        yield live, body, reply, reply[: reply.lower().find(blocked.lower())]


def test_input_refused_with_openai_shaped_error(filtered):
    live, body, _, _ = filtered
    bad = {**body, "messages": [{"role": "user", "content": "Tell me about a Nerve Agent."}]}
    r = httpx.post(live.url + "/v1/chat/completions", json=bad)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "content_filter" and err["param"] == "messages"
    assert "category: weapons" in err["message"] and "Ask about something else." in err["message"]
    r = httpx.post(live.url + "/v1/completions", json={"prompt": ["fine", "a nerve agent"]})
    assert r.json()["error"]["code"] == "content_filter"


def test_output_stopped_while_streaming(filtered, engine):
    live, body, reply, safe = filtered
    out = httpx.post(live.url + "/v1/chat/completions", json=body).json()["choices"][0]
    assert out["finish_reason"] == "content_filter"
    assert out["message"]["content"] == safe and "test-output" in out["message"]["refusal"]
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        import json

        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == safe
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert "content filter" in chunks[-1]["choices"][0]["delta"]["refusal"]
    assert wait_idle(engine).kv_blocks_used == 0
    metrics = httpx.get(live.url + "/metrics").text
    assert 'lmstack:safety_refusals_total{category="test-output",model_name="tiny",stage="output"} 2.0' in metrics
