"""kv_cache_dtype="fp8": the engine equals a full forward whose keys and values are rounded to fp8."""

import copy

import pytest
import torch
from engine_helpers import prompts, tiny_model

from lmstack.engine import LLM, EngineConfig, EngineCore, SamplingParams
from lmstack.engine.attention import to_cache_dtype
from lmstack.errors import ConfigError
from lmstack.model.attention import CausalContext

FP8 = torch.float8_e4m3fn


class RoundedToFP8(CausalContext):
    """Plain causal attention over keys and values rounded the way the fp8 cache stores them."""

    def attend(self, layer, q, k, v, window, dropout_p):
        k, v = (to_cache_dtype(t, FP8).to(q.dtype) for t in (k, v))
        return super().attend(layer, q, k, v, window, dropout_p)


def test_fp8_cache_logprobs_equal_a_forward_with_fp8_rounded_keys_and_values():
    model = copy.deepcopy(tiny_model("qwen3"))
    llm = LLM(model, block_size=4, num_blocks=64, max_num_batched_tokens=8,  # the prompt is cut into chunks
              kv_cache_dtype="fp8")
    assert llm.engine.kv.k.dtype == FP8
    (prompt,) = prompts([30], seed=3)
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0,
                                                logprobs=0))[0]
    ids = torch.tensor([prompt + out.outputs[0].token_ids])
    with torch.no_grad():
        rounded = model(ids, kv_cache=RoundedToFP8(torch.arange(ids.shape[1])[None])).logits[0]
        exact = model(ids).logits[0]
    logp = torch.log_softmax(rounded.float(), -1)[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
    got = torch.tensor(out.prompt_logprobs[1:] + out.outputs[0].logprobs)
    assert torch.allclose(got, logp, atol=1e-4, rtol=0)
    # and the rounding is real: the unrounded forward differs by far more than that tolerance
    plain = torch.log_softmax(exact.float(), -1)[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
    assert (plain - logp).abs().max() > 1e-3


def test_fp8_cache_holds_more_blocks_in_the_same_memory_and_bad_names_are_refused():
    model = tiny_model("llama")
    sizes = {dtype: EngineCore(model, config=EngineConfig(cpu_kv_cache_gib=0.01, kv_cache_dtype=dtype)).kv.num_blocks
             for dtype in ("auto", "fp8")}
    assert 4 * sizes["auto"] <= sizes["fp8"] < 4 * (sizes["auto"] + 1)  # 1 byte per value, not float32's 4
    with pytest.raises(ConfigError, match="kv_cache_dtype='int4' is not one of auto, fp8, fp8_e4m3"):
        EngineConfig(kv_cache_dtype="int4").validate()


@pytest.mark.cuda
def test_fp8_cache_on_cuda_with_triton_and_graphs():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 conversion in Triton needs compute capability >= 8.9")
    model = copy.deepcopy(tiny_model("qwen3")).cuda()
    llm = LLM(model, block_size=4, num_blocks=64, max_num_seqs=4, kv_cache_dtype="fp8")
    assert llm.engine.runner.backend == "triton" and llm.engine.runner.graphs
    (prompt,) = prompts([30], seed=3)
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0,
                                                logprobs=0))[0]
    ids = torch.tensor([prompt + out.outputs[0].token_ids], device="cuda")
    with torch.no_grad():
        rounded = model(ids, kv_cache=RoundedToFP8(torch.arange(ids.shape[1], device="cuda")[None])).logits[0]
    logp = torch.log_softmax(rounded.float(), -1)[:-1].gather(1, ids[0, 1:, None]).squeeze(1).cpu()
    got = torch.tensor(out.prompt_logprobs[1:] + out.outputs[0].logprobs)
    assert torch.allclose(got, logp, atol=1e-3, rtol=0)  # fp32 on GPU: TF32-free kernels, small rounding only
