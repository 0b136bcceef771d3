"""The loss is torch's cross-entropy on shifted logits, with ignored positions left out."""

import torch
import torch.nn.functional as F

import lmstack


def test_loss_equals_cross_entropy_on_shifted_logits():
    model, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    ids = torch.randint(0, 256, (3, 16))
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
    x = torch.randint(0, 256, (2, 8))
    y = torch.randint(0, 256, (2, 8))
    out = model(x, labels=y, shift_labels=False)
    ref = F.cross_entropy(out.logits.reshape(-1, 256), y.reshape(-1))
    assert torch.allclose(out.loss, ref, atol=1e-6)


def test_all_labels_masked_gives_zero_not_nan():
    model, _ = lmstack.load("tiny-qwen2", random_init=True, seed=0)
    ids = torch.randint(0, 256, (1, 6))
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
    ids = torch.randint(0, 250, (2, 9))
    a, b = small(ids, labels=ids), padded(ids, labels=ids)
    assert b.logits.shape[-1] == 250
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.loss, b.loss, atol=1e-6)
