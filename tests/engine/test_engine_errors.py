"""Requests that can never be served, and bad options, fail before any work with a clear message."""

import pytest
from engine_helpers import prompts, tiny_model

from lmstack.engine import LLM, EngineConfig, EngineCore, SamplingParams
from lmstack.errors import ConfigError, LmstackError, RequestError


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("llama"), block_size=4, num_blocks=8, max_model_len=64)


@pytest.mark.parametrize("length,params,message", [
    (64, SamplingParams(max_tokens=1), "the prompt has 64 tokens but max_model_len is 64"),
    (60, SamplingParams(max_tokens=10), r"prompt \(60 tokens\) \+ max_tokens \(10\) exceeds max_model_len=64; "
                                        r"use max_tokens <= 4"),
    (30, SamplingParams(max_tokens=8), r"the request needs up to 10 KV blocks .* the pool has 8; lower max_tokens"),
    (0, SamplingParams(), r"the prompt is empty; give at least one token"),
    (5, SamplingParams(temperature=-1.0), r"temperature=-1\.0 must be >= 0"),
])
def test_requests_that_cannot_be_served_are_rejected(llm, length, params, message):
    ok, bad = prompts([5, length], seed=7)
    # in a batch the message names the prompt at fault (its index, as infer.generate's "prompt 1 is empty")
    with pytest.raises(LmstackError, match=f"^prompt 1: {message}"):
        llm.generate([ok, bad], params if length != 5 else [SamplingParams(), params])
    assert not llm.engine.has_unfinished()  # nothing was queued: the whole batch is checked first
    with pytest.raises(LmstackError, match=f"^{message}"):  # one prompt: no index to give
        llm.generate([bad], params)
    assert not llm.engine.has_unfinished()


def test_bad_arguments(llm):
    with pytest.raises(ConfigError, match="sampling_params has 2 entries but there are 1 prompts"):
        llm.generate([[5, 6]], [SamplingParams(), SamplingParams()])
    with pytest.raises(ConfigError, match="text prompts need a tokenizer"):
        llm.generate("hello")
    with pytest.raises(RequestError, match=r"^prompt token id 999 is outside the vocabulary \[0, 256\)$"):
        llm.generate([[5, 999]])
    with pytest.raises(RequestError, match=r"^prompt 2: prompt token id -1 is outside the vocabulary \[0, 256\)$"):
        llm.generate([[5, 6], [7], [8, -1, 300]])
    with pytest.raises(ConfigError, match="unknown engine option.*'num_block'"):
        LLM(tiny_model("llama"), num_block=3)
    with pytest.raises(ConfigError, match="attention_backend='flash' is not one of"):
        LLM(tiny_model("llama"), num_blocks=4, attention_backend="flash")
    for value in (float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigError, match=r"cpu_kv_cache_gib=.* must be a finite number"):
            EngineConfig(cpu_kv_cache_gib=value).validate()
    core = EngineCore(tiny_model("llama"), config=EngineConfig(num_blocks=4))
    core.add_request([5, 6], request_id="a")
    with pytest.raises(RequestError, match="request_id 'a' is already in use"):
        core.add_request([5, 6], request_id="a")
