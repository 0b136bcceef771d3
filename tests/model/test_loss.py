"""The loss is torch's cross-entropy on shifted logits, with ignored positions left out."""

import torch
import torch.nn.functional as F

import lmstack


def test_loss_equals_cross_entropy_on_shifted_logits():
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 10:] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-6)
    # ignored positions do not count: a float64 mean over exactly the kept positions agrees
    logp = torch.log_softmax(out.logits[:, :-1].double(), dim=-1)
    kept = [(b, t) for b in range(3) for t in range(15) if labels[b, t + 1] != -100]
    manual = -sum(logp[b, t, labels[b, t + 1]] for b, t in kept) / len(kept)
    assert len(kept) == 45 - 4 - 6  # labels[0, 1:5] and labels[2, 10:16] are ignored
    assert abs(out.loss.item() - manual.item()) <= 1e-5


def test_pre_shifted_targets():
    model, _ = lmstack.load("tiny-gpt2", random_init=True, seed=0)
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    out = model(x, labels=y, shift_labels=False)
    ref = F.cross_entropy(out.logits.reshape(-1, 256), y.reshape(-1))
    assert torch.allclose(out.loss, ref, atol=1e-6)


def test_all_labels_masked_gives_zero_not_nan():
    model, _ = lmstack.load("tiny-qwen2", random_init=True, seed=0)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0


def test_padded_vocab_keeps_outputs(tmp_path):
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    model.save_pretrained(tmp_path)
    padded_cfg = model.config.replace(vocab_size=250, pad_vocab_to_multiple=64)
    assert padded_cfg.padded_vocab_size == 256
    base_cfg = model.config.replace(vocab_size=250)
    small = lmstack.Transformer(base_cfg)
    padded = lmstack.Transformer(padded_cfg)
    with torch.no_grad():
        for name, p in small.named_parameters():
            q = dict(padded.named_parameters())[name]
            q.zero_()
            q[tuple(slice(0, s) for s in p.shape)].copy_(p)
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(5))
    a, b = small(ids, labels=ids), padded(ids, labels=ids)
    assert b.logits.shape[-1] == 250
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.loss, b.loss, atol=1e-6)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_equals_torch_cross_entropy_in_float64():
    """loss_chunk_tokens: same loss and gradients as F.cross_entropy on full logits (float64), with
    ignored labels, a padded vocabulary, tied embeddings, both label layouts and a ragged last chunk."""
    for preset, vocab, tied in (("tiny-llama", 250, False), ("tiny-gpt2", 256, True)):
        config = lmstack.get_preset(preset).replace(vocab_size=vocab, pad_vocab_to_multiple=64,
                                                     tie_embeddings=tied)
        model, _ = lmstack.load(preset, random_init=True, seed=0, config=config)
        model = model.double()
        ids = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(6))
        labels = ids.clone()
        labels[0, :5] = -100
        for shift in (True, False):
            model.loss_chunk_tokens = 0
            logits = model(ids).logits  # the reference: torch's cross-entropy on the full logits
            logits, target = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
            ref = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=-100)
            want = _grads(model, ref)
            model.loss_chunk_tokens = 7  # 45 or 48 tokens: the last chunk is partial
            chunked = model(ids, labels=labels, shift_labels=shift)
            assert chunked.logits is None  # never materialised
            assert abs(chunked.loss.item() - ref.item()) <= 1e-12
            got = _grads(model, chunked.loss)
            assert got.keys() == want.keys()
            for name in want:
                assert torch.allclose(got[name], want[name], atol=1e-12, rtol=1e-10), (preset, shift, name)


def test_chunked_loss_under_bf16_autocast_follows_the_full_loss():
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7))
    results = []
    for chunk in (0, 16):
        model.loss_chunk_tokens = chunk
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        results.append((loss.item(), _grads(model, loss)))
    (full, want), (chunked, got) = results
    assert abs(full - chunked) <= 1e-3 * abs(full)  # bf16 matmuls, float32 softmax on both paths
    for name in want:
        scale = want[name].abs().max().item()
        assert (got[name] - want[name]).abs().max().item() <= 0.02 * scale + 1e-6, name


def test_left_padded_labels_ignore_what_a_padding_position_predicts(tmp_path):
    """The usual collator masks pad labels only; the first real token's label is then predicted
    from a pad position, which sees nothing real. It is ignored too: the loss equals transformers'
    with that label masked as well, and no longer depends on what the padding holds."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from hf_models import hf_model

    ref = hf_model("llama", seed=0)
    ref.save_pretrained(tmp_path)
    model, _ = lmstack.load(tmp_path)
    ids = torch.randint(3, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 is left-padded by 4
    labels = ids.masked_fill(mask == 0, -100)
    strict = labels.clone()
    strict[0, 4] = -100  # predicted from position 3, a pad
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=labels).loss
        theirs = ref(ids, attention_mask=mask, labels=strict).loss
        other_padding = model(ids.masked_fill(mask == 0, 7), attention_mask=mask, labels=labels).loss
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert abs(ours.item() - other_padding.item()) < 1e-6
