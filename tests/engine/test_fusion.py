"""Compiled pointwise kernels (model/fusion.py) change no result: model logits, then the engine."""

import copy

import pytest
import torch
from engine_helpers import alone, prompts, tiny_model

from lmstack.engine import LLM, SamplingParams
from lmstack.model.fusion import fuse_pointwise, unfuse_pointwise
from lmstack.model.norms import RMSNorm, rms_norm


def test_fused_pointwise_kernels_give_the_eager_logits_and_engine_outputs():
    eager = tiny_model("qwen3")  # QK-norm, RoPE and SwiGLU: every function fusion swaps
    fused = copy.deepcopy(eager)  # tiny_model is cached and shared: never mutate it
    layers = eager.config.num_layers
    assert fuse_pointwise(fused) == 4 * layers + 1 + 2 * layers  # norms (2 + q/k per layer, final), attn, mlp
    assert all(m.norm_fn is not rms_norm for m in fused.modules() if isinstance(m, RMSNorm))
    assert all(m.norm_fn is rms_norm for m in eager.modules() if isinstance(m, RMSNorm))

    ids = torch.tensor(prompts([7, 7], seed=4))
    with torch.no_grad():
        want, got = eager(ids).logits, fused(ids).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        one = fused(ids[:1, :3]).logits  # another shape: dynamic, no wrong specialisation
        assert torch.allclose(one, eager(ids[:1, :3]).logits, atol=1e-5, rtol=1e-5)
    unfuse_pointwise(fused)
    assert all(m.norm_fn is rms_norm for m in fused.modules() if isinstance(m, RMSNorm))


def test_engine_option_fuse_pointwise_switches_the_model_and_changes_no_output():
    eager = tiny_model("qwen3")
    model = copy.deepcopy(eager)
    ps = prompts([5, 12, 9], seed=5)
    llm = LLM(model, block_size=4, num_blocks=64, fuse_pointwise=True)
    assert all(m.norm_fn is not rms_norm for m in model.modules() if isinstance(m, RMSNorm))
    outs = llm.generate(ps, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0))
    for p, out in zip(ps, outs):
        reference = alone(eager, p, 8, logprobs=0).outputs[0]
        assert out.outputs[0].token_ids == reference.token_ids
        assert torch.allclose(torch.tensor(out.outputs[0].logprobs), torch.tensor(reference.logprobs), atol=1e-4)


@pytest.mark.cuda
def test_fused_pointwise_under_cuda_graphs_gives_the_unfused_engine_outputs():
    """Compiled kernels captured in the decode graphs (fp32, so tokens must match exactly)."""
    eager = copy.deepcopy(tiny_model("qwen3")).cuda()
    ps = prompts([3, 9, 26, 14, 5, 33], seed=1)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    plain = LLM(eager, block_size=4, num_blocks=64, max_num_seqs=8).generate(ps, params)
    model = copy.deepcopy(eager)
    llm = LLM(model, block_size=4, num_blocks=64, max_num_seqs=8, fuse_pointwise=True)
    assert llm.engine.runner.graphs
    fused = llm.generate(ps, params)
    for a, b in zip(plain, fused):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert torch.allclose(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs), atol=1e-4)
