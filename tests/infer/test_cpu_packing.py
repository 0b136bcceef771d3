"""CPU decoding over oneDNN-packed weights computes what the plain model computes."""

import pytest
import torch
import torch.nn.functional as F
from hf_models import randomize_

import lmstack
from lmstack.infer import GenerationConfig, cpu_packing, generate
from lmstack.infer.cpu_packing import (
    KV_TO_WEIGHT_BYTES,
    PackedLinear,
    _blas_step,
    blas_decode_pays,
    blas_decode_step,
    can_pack,
    packed_for_cpu_decoding,
    packed_view,
)
from lmstack.infer.decoder import Decoder, PackedDecoder, make_decoder
from lmstack.model import KVCache

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
needs_torch_openmp = pytest.mark.skipif(cpu_packing._thread_pools()[1] is None,
                                        reason="BLAS decode steps need torch's OpenMP runtime")


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


@needs_torch_openmp
@pytest.mark.parametrize("bias", [True, False])
def test_blas_gemv_step_matches_float64(bias):
    linear = torch.nn.Linear(300, 70, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(1, 1, 300)
    ref = F.linear(x.double(), linear.weight.double(), linear.bias.double() if bias else None)
    threads = torch.get_num_threads()
    with torch.inference_mode(), blas_decode_step():
        assert torch.get_num_threads() == 1 and _blas_step.active
        out = packed(x)
    assert torch.get_num_threads() == threads and not _blas_step.active  # restored
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.fixture()
def two_torch_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@needs_torch_openmp
def test_blas_decode_is_used_only_where_it_pays(monkeypatch):
    model, _ = lmstack.load("tiny-gpt2", random_init=True, seed=0)
    view = packed_view(model.eval())
    c = view.config
    kv_per_position = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    short = int(KV_TO_WEIGHT_BYTES * view.packed_weight_bytes // kv_per_position)
    assert short >= 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_packing, "blas_threads", lambda: 2)
    assert blas_decode_pays(view, 1, short)
    assert not blas_decode_pays(view, 1, short + 1)  # attention over a long cache would run on one core
    assert not blas_decode_pays(view, 2, 1)  # several rows: oneDNN's GEMM is faster than BLAS there
    monkeypatch.setattr(cpu_packing, "blas_threads", lambda: 1)
    assert not blas_decode_pays(view, 1, 1)  # a one-thread BLAS streams slower than 2-thread oneDNN
    monkeypatch.setattr(cpu_packing, "blas_threads", lambda: 4)
    assert not blas_decode_pays(view, 1, 1)  # BLAS would use cores the user kept from torch
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(cpu_packing, "blas_threads", lambda: 1)
    assert not blas_decode_pays(view, 1, 1)  # torch limited to one thread: nothing to gain
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_packing, "blas_threads", lambda: 2)
    monkeypatch.setenv("LMSTACK_CPU_BLAS_GEMV", "0")
    assert not blas_decode_pays(view, 1, 1)


@needs_torch_openmp
@pytest.mark.parametrize("blas_switch", ["1", "0"])
def test_generate_through_blas_steps_equals_the_plain_model(monkeypatch, two_torch_threads, blas_switch):
    """LMSTACK_CPU_BLAS_GEMV=0 keeps every step on oneDNN's packed weights, with the same output."""
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    randomize_(model, seed=3, std=0.15).eval()
    monkeypatch.setattr(cpu_packing, "KV_TO_WEIGHT_BYTES", 1e9)  # every batch-1 step of this tiny model
    monkeypatch.setattr(cpu_packing, "blas_threads", lambda: 2)
    monkeypatch.setenv("LMSTACK_CPU_BLAS_GEMV", blas_switch)
    blas_rows = []
    forward = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward",
                        lambda self, x: blas_rows.append(_blas_step.active) or forward(self, x))
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, logprobs=0)
    decoder = make_decoder(model)
    assert isinstance(decoder, PackedDecoder)
    fast = generate(model, [prompt], config, decoder=decoder)[0].outputs[0]
    linear_calls = 12 * (len(model.layers) * 4 + 1)  # prefill + 11 decode steps x (qkv, o, gate_up, down, head)
    assert len(blas_rows) == linear_calls  # the packed copy ran every product either way
    # 11 decode steps through BLAS, or none when switched off
    assert sum(blas_rows) == (11 * (len(model.layers) * 4 + 1) if blas_switch == "1" else 0)
    plain = generate(model, [prompt], config, decoder=Decoder(model))[0].outputs[0]
    assert fast.token_ids == plain.token_ids
    assert max(abs(a - b) for a, b in zip(fast.logprobs, plain.logprobs)) < 1e-5


def _generate_with(model, decoder=None):
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True, logprobs=0)
    return generate(model, [prompt], config, decoder=decoder)[0].outputs[0]


def _same_output(out, ref):
    return out.token_ids == ref.token_ids and max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs)) < 1e-5


def test_cpu_pack_switch_off_decodes_the_model_itself(monkeypatch):
    """LMSTACK_CPU_PACK=0: make_decoder hands out a plain Decoder over the user's model, no packed
    copy is made and no packed product runs, and the output is the plain path's."""
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    randomize_(model, seed=3, std=0.15).eval()
    packed_calls = []
    forward = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: packed_calls.append(1) or forward(self, x))
    reference = _generate_with(model, Decoder(model))
    assert not packed_calls

    monkeypatch.setenv("LMSTACK_CPU_PACK", "1")  # the default: packed
    assert can_pack(model) and isinstance(make_decoder(model), PackedDecoder)
    assert _same_output(_generate_with(model), reference) and packed_calls

    cpu_packing.forget(model)
    packed_calls.clear()
    monkeypatch.setenv("LMSTACK_CPU_PACK", "0")
    assert not can_pack(model)
    decoder = make_decoder(model)
    assert type(decoder) is Decoder and decoder.model is model
    assert _same_output(_generate_with(model), reference)
    assert not packed_calls and model not in cpu_packing._packed_views  # no copy made, none used


def test_models_over_the_packing_limit_are_not_packed(monkeypatch):
    """MAX_PACKED_BYTES (LMSTACK_CPU_PACK_MAX_BYTES): linear weights of exactly the limit are
    packed, one byte more than the limit are not; the output is the same either way."""
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    randomize_(model, seed=3, std=0.15).eval()
    size = cpu_packing.linear_weight_bytes(model)
    reference = _generate_with(model, Decoder(model))
    monkeypatch.delenv("LMSTACK_CPU_PACK", raising=False)
    monkeypatch.setattr(cpu_packing, "MAX_PACKED_BYTES", size)
    assert can_pack(model) and isinstance(make_decoder(model), PackedDecoder)
    assert _same_output(_generate_with(model), reference)
    cpu_packing.forget(model)
    monkeypatch.setattr(cpu_packing, "MAX_PACKED_BYTES", size - 1)
    assert not can_pack(model)
    decoder = make_decoder(model)
    assert type(decoder) is Decoder and decoder.model is model
    assert _same_output(_generate_with(model), reference) and model not in cpu_packing._packed_views


def test_cpu_pack_max_bytes_is_read_from_the_environment(monkeypatch):
    """LMSTACK_CPU_PACK_MAX_BYTES one byte below this model's linear weights: it decodes unpacked, with
    the same tokens; a size like 1GB packs it again; a value that is no size is named."""
    from lmstack.errors import ConfigError

    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    randomize_(model, seed=3, std=0.15).eval()
    size = cpu_packing.linear_weight_bytes(model)
    reference = _generate_with(model, Decoder(model))
    monkeypatch.delenv("LMSTACK_CPU_PACK", raising=False)  # the limit alone must turn packing off
    monkeypatch.setenv("LMSTACK_CPU_PACK_MAX_BYTES", str(size - 1))
    assert cpu_packing.max_packed_bytes() == size - 1 and type(make_decoder(model)) is Decoder
    assert _same_output(_generate_with(model), reference) and model not in cpu_packing._packed_views
    monkeypatch.setenv("LMSTACK_CPU_PACK_MAX_BYTES", "1GB")
    assert cpu_packing.max_packed_bytes() == 10**9 and cpu_packing.can_pack(model)
    monkeypatch.setenv("LMSTACK_CPU_PACK_MAX_BYTES", "lots")
    with pytest.raises(ConfigError, match=r"LMSTACK_CPU_PACK_MAX_BYTES='lots' is not a size: give bytes"):
        cpu_packing.can_pack(model)


@needs_torch_openmp
def test_blas_steps_in_several_python_threads_change_only_their_own_thread(monkeypatch, two_torch_threads):
    """OpenMP's team size is per OS thread: each decoding thread runs its steps on one thread and
    gets its own count back; other threads, and threads started meanwhile, keep torch's count."""
    import threading

    model, _ = lmstack.load("tiny-gpt2", random_init=True, seed=0)
    model.eval()
    monkeypatch.setattr(cpu_packing, "KV_TO_WEIGHT_BYTES", 1e9)
    monkeypatch.setattr(cpu_packing, "blas_threads", lambda: 2)
    inside, in_step = [], threading.Event()
    forward = PackedLinear.forward

    def watched(self, x):
        if _blas_step.active:
            inside.append(torch.get_num_threads())
            in_step.set()
        return forward(self, x)

    monkeypatch.setattr(PackedLinear, "forward", watched)
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    prompt = torch.randint(0, 256, (5,)).tolist()
    expected = generate(model, [prompt], config, decoder=Decoder(model))[0].outputs[0].token_ids
    results, counts = [], []

    def decode():
        before = torch.get_num_threads()
        results.append(generate(model, [prompt], config)[0].outputs[0].token_ids)
        counts.append((before, torch.get_num_threads()))

    def newcomer():  # its first torch call lands while the others are mid-decode
        in_step.wait()
        counts.append(("new", torch.get_num_threads()))

    workers = [threading.Thread(target=decode) for _ in range(3)] + [threading.Thread(target=newcomer)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert results == [expected] * 3
    assert inside and set(inside) == {1}  # every BLAS step ran torch's ops on one thread
    assert sorted(counts, key=str) == sorted([(2, 2)] * 3 + [("new", 2)], key=str)
    assert torch.get_num_threads() == 2


def test_forget_drops_a_copy_that_data_writes_left_stale():
    model, _ = lmstack.load("tiny-gpt2", random_init=True, seed=0)
    model.eval()
    ids = torch.randint(0, 256, (1, 9))
    first = packed_view(model)
    model.layers[0].mlp.up.weight.data.mul_(3.0)  # no version counter sees this
    assert packed_view(model) is first
    cpu_packing.forget(model)
    with torch.inference_mode():
        assert (packed_view(model)(ids).logits - model(ids).logits).abs().max() <= 1e-5
