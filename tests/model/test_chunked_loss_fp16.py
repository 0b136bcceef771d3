"""The chunked loss under fp16 autocast with a GradScaler-sized loss scale: its gradients are as
accurate as the plain loss's (against float64). d(loss)/d(logits) = (softmax - one_hot) / tokens is
about 1/(vocab x tokens), below float16's range unless the loss scale multiplies it before the cast."""

import torch
import torch.nn.functional as F

from lmstack.model.chunked_loss import chunked_cross_entropy

N, D, V, CHUNK = 8192, 32, 1024, 1024  # ~6.5k loss tokens, 1k vocabulary: entries near 1.5e-7


def _data():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g) * 0.5
    weight = torch.randn(V, D, generator=g) * 0.05
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels


def _fp16_grads(loss_fn, hidden, weight, scale):
    """Gradients as a GradScaler gives them: backward of loss * scale, then divided by scale."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_fn(h, w)
    (loss * scale).backward()
    return loss.detach(), h.grad / scale, w.grad / scale


def test_chunked_gradients_under_fp16_autocast_and_loss_scale_match_the_plain_loss():
    hidden, weight, labels = _data()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), labels, ignore_index=-100)  # torch's loss in float64
    ref.backward()

    def rel(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    scale = 65536.0  # GradScaler's initial scale
    # the model's plain path: an fp16 head matmul, the cross-entropy upcast to float32
    plain = _fp16_grads(lambda h, w: F.cross_entropy((h @ w.t()).float(), labels), hidden, weight, scale)
    chunked = _fp16_grads(lambda h, w: chunked_cross_entropy(h, w, labels, CHUNK), hidden, weight, scale)
    assert abs(chunked[0].item() - ref.item()) <= 1e-3 * ref.item()
    for i, (name, want) in enumerate((("grad_hidden", h64.grad), ("grad_lm_head", w64.grad)), start=1):
        plain_err, chunked_err = rel(plain[i], want), rel(chunked[i], want)
        assert plain_err < 1e-3, (name, plain_err)
        # before the fix: 6.9e-3 (hidden) and 1.4e-2 (head), 20-40 times the plain path's 3.4e-4
        assert chunked_err <= 1.5 * plain_err, (name, chunked_err, plain_err)
        assert (chunked[i] == 0).sum() <= (plain[i] == 0).sum(), name  # no entries flushed to zero


def test_chunked_gradients_overflow_under_fp16_like_the_plain_loss():
    """A loss scale too large for float16 gives inf, as on the plain path: the GradScaler's signal
    to skip the step and lower the scale."""
    hidden, weight, labels = _data()
    scale = 2.0**40
    plain = _fp16_grads(lambda h, w: F.cross_entropy((h @ w.t()).float(), labels), hidden, weight, scale)
    chunked = _fp16_grads(lambda h, w: chunked_cross_entropy(h, w, labels, CHUNK), hidden, weight, scale)
    for i in (1, 2):
        assert not torch.isfinite(plain[i]).all()
        assert not torch.isfinite(chunked[i]).all()


def test_chunked_loss_in_an_fp16_model_needs_no_autocast():
    """Float16 weights and hidden states (no autocast): the same recomputing backward, same accuracy."""
    hidden, weight, labels = _data()
    hidden, labels = hidden[:2048], labels[:2048]
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    F.cross_entropy(h64 @ w64.t(), labels, ignore_index=-100).backward()
    grads = []
    for fn in (lambda h, w: F.cross_entropy((h @ w.t()).float(), labels),
               lambda h, w: chunked_cross_entropy(h, w, labels, 300)):
        h, w = hidden.half().requires_grad_(), weight.half().requires_grad_()
        (fn(h, w) * 4096.0).backward()
        assert h.grad.dtype == w.grad.dtype == torch.float16
        grads.append((h.grad.double() / 4096.0, w.grad.double() / 4096.0))
    for plain, chunked, want in zip(grads[0], grads[1], (h64.grad, w64.grad)):
        plain_err = ((plain - want).norm() / want.norm()).item()
        chunked_err = ((chunked - want).norm() / want.norm()).item()
        assert chunked_err <= 1.5 * plain_err + 1e-4, (chunked_err, plain_err)
