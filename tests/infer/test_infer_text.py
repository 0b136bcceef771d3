"""Text: stop strings spanning tokens, streaming deltas of complete UTF-8, chat history budget."""

import pytest
import torch
from tiny_dir import tiny_model_dir, tiny_tokenizer

import lmstack
from lmstack.errors import ConfigError
from lmstack.infer import GenerationConfig, SamplingParams, generate, stream
from lmstack.infer.chat import ChatSession
from lmstack.infer.stopping import SequenceState


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    model, tokenizer = lmstack.load(path)
    return model.eval(), tokenizer


def _feed(state, tokens):
    deltas = []
    for t in tokens:
        deltas.append(state.append(t))
        if state.finished:
            break
    return deltas


def test_deltas_are_complete_characters_and_join_to_the_text():
    tok = tiny_tokenizer()
    text = "naïve café ✓ 日本語"
    ids = tok.encode(text)
    # one token per byte, the hardest case for streaming: every multi-byte character is split
    byte_ids = [i for ch in text for i in tok.encode(ch)]
    assert tok.decode(byte_ids) == text and len(byte_ids) > len(text)
    state = SequenceState(0, SamplingParams(max_tokens=100), 100, [], tok)
    deltas = _feed(state, byte_ids) + [state.finish()]
    assert "".join(deltas) == text == state.out.text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) <= len(byte_ids)
    assert any(len(d) == 0 for d in deltas)  # some bytes were held back until their character completed


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_is_found_and_cut(include):
    tok = tiny_tokenizer()
    text = "To be, or not to be, that is the question."
    ids = [i for ch in text for i in tok.encode(ch)]  # a character per token: "not to" spans 6 tokens
    params = SamplingParams(stop=["not to", "zzz"], include_stop_str_in_output=include)
    state = SequenceState(0, params, 100, [], tok)
    deltas = _feed(state, ids)
    expected = "To be, or not to" if include else "To be, or "
    assert "".join(deltas) == expected == state.out.text
    assert (state.out.finish_reason, state.out.stop_reason) == ("stop", "not to")
    assert tok.decode(state.out.token_ids) == "To be, or not to"  # tokens up to the one completing it
    # a near miss ("not a") is released once it cannot be a stop string any more
    state = SequenceState(0, params, 100, [], tok)
    near = "I am not a fox"
    assert "".join(_feed(state, [i for ch in near for i in tok.encode(ch)]) + [state.finish()]) == near


def test_generate_stop_strings_on_a_model(tiny):
    model, tok = tiny
    plain = generate(model, "The quick", GenerationConfig(max_new_tokens=30, ignore_eos=True), tok)[0].outputs[0]
    assert len(plain.text) > 8
    stop = plain.text[3:7]
    cut = generate(model, "The quick", GenerationConfig(max_new_tokens=30, ignore_eos=True, stop=[stop]), tok)
    got = cut[0].outputs[0]
    assert got.text == plain.text[: plain.text.index(stop)]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    assert got.token_ids == plain.token_ids[: len(got.token_ids)]


def test_stream_equals_generate_text(tiny):
    model, tok = tiny
    config = GenerationConfig(max_new_tokens=25, temperature=0.9, seed=4, ignore_eos=True, stop=["e "])
    whole = generate(model, "Héllo", config, tok)[0].outputs[0]
    out = []
    pieces = list(stream(model, "Héllo", config, tok, output=out))
    assert "".join(pieces) == whole.text
    assert out[0].token_ids == whole.token_ids and out[0].finish_reason == whole.finish_reason


def test_chat_session_drops_oldest_turns_to_fit(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, GenerationConfig(max_new_tokens=24), system="Be brief.")
    session.context = 128  # a short window, so a few turns overflow it
    session.answer_room = 24
    for i in range(5):
        answer = "".join(session.send(f"Question number {i}: what is the answer to everything?"))
        assert isinstance(answer, str)
        assert session.last_prompt_tokens + session.answer_room <= session.context
    assert session.dropped_turns > 0
    assert session.messages[0]["role"] == "user" and "Question number" in session.messages[0]["content"]
    assert "Question number 4" in session.messages[-2]["content"]
    with pytest.raises(ConfigError, match="send a shorter message"):
        session.prompt_ids("word " * 200)


def test_tokenizer_text_prompt_and_batch(tiny):
    model, tok = tiny
    outs = generate(model, ["The quick", "To be"], GenerationConfig(max_new_tokens=5, ignore_eos=True), tok)
    assert [o.prompt for o in outs] == ["The quick", "To be"]
    alone = generate(model, "To be", GenerationConfig(max_new_tokens=5, ignore_eos=True), tok)[0]
    assert outs[1].outputs[0].text == alone.outputs[0].text
    assert torch.tensor(outs[0].prompt_token_ids).tolist() == tok.encode("The quick", add_special_tokens=True)


def test_chat_session_refuses_max_new_tokens_0(tiny):
    """0 means 'score only' in the engine; a chat turn must generate, so it is an error, not 'unset'."""
    model, tok = tiny
    with pytest.raises(ConfigError, match=r"max_tokens=0 \(score the prompt, generate nothing\) is for the engine"):
        ChatSession(model, tok, GenerationConfig(max_new_tokens=0))
