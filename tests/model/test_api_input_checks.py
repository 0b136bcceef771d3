"""The Python API names what is wrong with its arguments instead of failing deep inside torch."""

import numpy as np
import pytest
import torch

import lmstack
from lmstack import SamplingParams
from lmstack.errors import CheckpointError, ConfigError, TokenizerError
from lmstack.infer import GenerationConfig, generate
from lmstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    return lmstack.load("tiny-llama", random_init=True, seed=0)[0].eval()


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="gpu"), r"--device 'gpu' is not a device lmstack runs on"),
    (dict(dtype=torch.int64), r"dtype torch.int64 is not a floating-point type"),
    (dict(config={"vocab_size": 10}), r"config must be a ModelConfig, got dict"),
])
def test_load_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        lmstack.load("tiny-llama", random_init=True, **kwargs)
    with pytest.raises(CheckpointError, match="give a model directory or a preset name, got ''"):
        lmstack.load("")


@pytest.mark.parametrize("kwargs, message", [
    (dict(logit_bias={1: float("inf")}), r"logit_bias=\{1: inf\} must map token ids to finite biases"),
    (dict(logit_bias={1: float("nan")}), r"logit_bias=\{1: nan\} must map token ids to finite biases"),
    (dict(seed=2**64), r"seed=18446744073709551616 must be an integer that fits in 64 bits"),
    (dict(stop=5), r"stop=5 must be a string or a list of strings"),
    (dict(temperature="0.5"), r"temperature='0.5' must be a finite number"),
    (dict(temperature=float("nan")), r"temperature=nan must be a finite number"),
])
def test_sampling_params_that_would_give_garbage_or_crash_mid_generation(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(model, [[1, 2]], SamplingParams(max_tokens=3, **kwargs))


def test_prompts_and_configs_of_the_wrong_kind(model):
    with pytest.raises(ConfigError, match=r"logit_bias=\{'a': 1\} must map integer token ids to numbers"):
        SamplingParams(logit_bias={"a": 1})
    with pytest.raises(ConfigError, match="config must be a GenerationConfig or SamplingParams, got dict"):
        generate(model, [[1, 2]], {"max_tokens": 2})
    with pytest.raises(ConfigError, match="prompts must be a string, a list of token ids, or a list of either"):
        generate(model, None)
    with pytest.raises(ConfigError, match=r"prompt 1 is 5; each prompt is a string or a sequence of integer token ids"):
        generate(model, [[1, 2], 5])
    with pytest.raises(ConfigError, match=r"an array prompt must hold integer token ids, shaped \(T,\) or \(B, T\)"):
        generate(model, torch.ones(1, 2, 3, dtype=torch.long))
    ids = [3, 4, 5]
    want = generate(model, [ids], GenerationConfig(max_new_tokens=2))[0].outputs[0].token_ids
    for same in ([np.int64(3), np.int64(4), np.int64(5)], [np.array(ids)], np.array([ids]), [torch.tensor(ids)],
                 torch.tensor(ids), list(torch.tensor(ids)), [range(3, 6)], (tuple(ids),)):
        assert generate(model, same, GenerationConfig(max_new_tokens=2))[0].outputs[0].token_ids == want, same
    with pytest.raises(ConfigError, match=r"prompt 0 is \[True, False\]"):
        generate(model, [[True, False]])
    with pytest.raises(ConfigError, match=r"an array prompt must hold integer token ids.* float32"):
        generate(model, np.ones((1, 2), dtype=np.float32))


def test_forward_names_bad_shapes(model):
    with pytest.raises(ConfigError, match=r"shaped \(batch, tokens\), got a torch.int64 tensor of shape \(3,\); "
                                          r"add the batch dimension"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match=r"labels \(1, 2\) must have the shape of input_ids \(1, 3\)"):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))


def test_save_and_tokenizer_paths(model, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match=f"cannot save to {tmp_path / 'afile'}: it is a file"):
        model.save_pretrained(tmp_path / "afile")
    with pytest.raises(CheckpointError, match="empty path"):
        model.save_pretrained("")
    with pytest.raises(CheckpointError, match="tokenizer must be an lmstack Tokenizer"):
        model.save_pretrained(tmp_path / "m", tokenizer="x")
    tok = Tokenizer.train(["hello world " * 40], 270)
    tok.save(tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok" / "tokenizer.json").fingerprint == tok.fingerprint  # the file itself
    with pytest.raises(TokenizerError, match="the text is not valid Unicode: a lone surrogate"):
        tok.encode("ok \ud800")
    with pytest.raises(TokenizerError, match="cannot decode token id -1"):
        tok.decode([-1])


def test_engine_generate_wants_sampling_params(model):
    import copy

    llm = lmstack.LLM(copy.deepcopy(model), block_size=4, num_blocks=16)
    with pytest.raises(ConfigError, match="sampling_params must be SamplingParams .* got dict"):
        llm.generate([[1, 2]], {"max_tokens": 1})
    with pytest.raises(ConfigError, match=r"prompt 1 is 5; each prompt is a string or a sequence of integer token ids"):
        llm.generate([[1, 2], 5], SamplingParams(max_tokens=1))
    with pytest.raises(ConfigError, match=r"priority of prompt 1 is 0.5; priorities are integers"):
        llm.generate([[1, 2], [3]], SamplingParams(max_tokens=1), priority=[0, 0.5])
