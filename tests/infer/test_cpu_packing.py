"""CPU decoding over oneDNN-packed weights computes what the plain model computes."""

import pytest
import torch
import torch.nn.functional as F
from hf_models import randomize_

import lmstack
from lmstack.infer.cpu_packing import PackedLinear, can_pack, packed_for_cpu_decoding, packed_view
from lmstack.infer.decoder import Decoder, make_decoder
from lmstack.model import KVCache

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


@pytest.mark.parametrize("shape,rows", [((50, 32), 1), ((96, 64), 5), ((7, 300), 3)])
def test_packed_linear_matches_float64(shape, rows):
    linear = torch.nn.Linear(shape[1], shape[0])
    x = torch.randn(2, rows, shape[1])
    ref = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    out = PackedLinear(linear)(x)
    assert out.shape == ref.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama", "mixtral"])
def test_packed_copy_shares_tensors_and_gives_the_same_logits(family):
    model, _ = lmstack.load(f"tiny-{family}", random_init=True, seed=0)
    randomize_(model, seed=2, std=0.15).eval()
    view = packed_for_cpu_decoding(model)
    assert view.embed.weight is model.embed.weight  # shared, not copied
    assert type(model.layers[0].attn.qkv) is torch.nn.Linear  # the user's model is untouched
    assert isinstance(view.layers[0].attn.qkv, PackedLinear) and isinstance(view.lm_head, PackedLinear)
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        a, b = model(ids).logits, view(ids).logits
        cache = KVCache(view.config, 2, 16)
        view(ids[:, :11], kv_cache=cache)
        step = view(ids[:, 11:], kv_cache=cache).logits
    assert (a - b).abs().max() <= 1e-5
    assert (step[:, -1] - a[:, -1]).abs().max() <= 1e-5


def test_only_plain_fp32_models_are_packed():
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    assert can_pack(model)
    assert isinstance(make_decoder(model).model.lm_head, PackedLinear)
    assert not can_pack(model.to(torch.bfloat16))
    assert isinstance(Decoder(model).model.lm_head, torch.nn.Linear)  # an explicit Decoder keeps the model


def test_packed_copy_is_kept_until_a_weight_changes():
    model, _ = lmstack.load("tiny-gpt2", random_init=True, seed=0)
    model.eval()
    ids = torch.randint(0, 256, (1, 9))
    first = make_decoder(model).model
    assert make_decoder(model).model is first  # not packed again for every generate()

    def packed_logits_follow_the_model():
        view = make_decoder(model).model
        with torch.inference_mode():
            return view, (view(ids).logits - model(ids).logits).abs().max().item() <= 1e-5

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, labels=ids).loss.backward()
    opt.step()  # in-place update: every weight's version moves
    after_step, same = packed_logits_follow_the_model()
    assert after_step is not first and same
    with torch.inference_mode():
        model.layers[0].mlp.up.weight.mul_(2.0)  # an edit made under inference mode is seen too
    after_edit, same = packed_logits_follow_the_model()
    assert after_edit is not after_step and same
    model.load_state_dict(lmstack.load("tiny-gpt2", random_init=True, seed=1)[0].state_dict())
    after_load, same = packed_logits_follow_the_model()
    assert after_load is not after_edit and same
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.padded_vocab_size, bias=False)
    assert packed_view(model).lm_head.out_features == model.config.padded_vocab_size
    assert packed_logits_follow_the_model()[1]  # a swapped module is a new tensor: packed again
