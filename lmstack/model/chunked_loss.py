"""The LM head and cross-entropy a chunk of tokens at a time, gradients included.

The usual loss materialises (tokens x vocab) logits, in float32 for the softmax: 8 x 2048
tokens with Llama-3's 128k vocabulary is 8.6 GB, usually the largest activation of a step.
`chunked_cross_entropy` never holds more than `chunk` rows of logits. It computes each chunk's
gradient with respect to the hidden states and the head weight during the forward pass, as
Liger-Kernel's fused linear cross-entropy does, so backward has nothing to recompute: the
same matmul FLOPs as the plain loss, and memory that no longer grows with the vocabulary.
Written here (about 100 lines of PyTorch) rather than taken from Liger, whose Triton kernels
would tie training to CUDA; this runs wherever PyTorch does.

Except in float16 (fp16 autocast, or an fp16 model): there d(loss)/d(logits) =
(softmax - one_hot) / tokens must not be cast to the matmul dtype before the incoming gradient
(the GradScaler's loss scale) multiplies it, or its small entries underflow (1/(vocab x tokens)
is about 3e-8 for 2k x 16k, below float16's smallest subnormal 6e-8) and the gradients come out
wrong by several percent. So in float16 the forward pass computes only the loss, and backward
recomputes each chunk's logits and applies grad_output (in float32) before the cast, exactly as
autograd does for the plain loss: one more head matmul per chunk (4 instead of 3), with the
same per-chunk memory. bfloat16 has float32's exponent range and keeps the one-pass path.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _narrow_range(dtype: torch.dtype) -> bool:
    """True for float16 (and narrower): small gradients underflow there unless scaled first."""
    return torch.finfo(dtype).smallest_normal > torch.finfo(torch.float32).smallest_normal


def _logits_grad(logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """(softmax(logits) - one_hot(labels)) * row_scale[:, None], in the logits' dtype."""
    grad = torch.softmax(logits, dim=-1)
    grad.scatter_add_(1, labels.clamp(min=0)[:, None], torch.full_like(grad[:, :1], -1.0))
    return grad.mul_(row_scale[:, None])


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        # softmax precision: float32 at least (bf16/fp16 matmul outputs are upcast), float64 stays
        precision = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        total = torch.zeros((), device=hidden.device, dtype=precision)
        needs_grad = hidden.requires_grad or weight.requires_grad
        matmul_dtype = (hidden[:0] @ weight.t()).dtype  # what autocast (if on) makes of the head matmul
        ctx.deferred = needs_grad and _narrow_range(matmul_dtype)  # float16: the gradients in backward
        grad_hidden = grad_weight = None
        if needs_grad and not ctx.deferred:
            grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
            grad_weight = torch.zeros_like(weight, dtype=precision) if weight.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, y, keep = hidden[start:start + chunk], labels[start:start + chunk], valid[start:start + chunk]
            raw = h @ weight.t()  # under autocast a bf16/fp16 matmul; the softmax is float32 either way
            logits = raw.to(precision)
            target = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            total += torch.where(keep, torch.logsumexp(logits, dim=-1) - target, 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(mean loss)/d(logits) = (softmax - one_hot(label)) / count, zero on ignored rows; in the
            # matmul's dtype, as autograd would hand it to the plain loss's matmul backward
            grad = _logits_grad(logits, y, keep.to(precision) / count).to(raw.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ weight.to(raw.dtype)
            if grad_weight is not None:
                grad_weight += grad.t() @ h.to(raw.dtype)
        if ctx.deferred:
            ctx.save_for_backward(hidden, weight, labels, count)
            ctx.matmul_dtype, ctx.precision, ctx.chunk = matmul_dtype, precision, chunk
        else:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.deferred:
            return _ChunkedLinearCrossEntropy._recompute_backward(ctx, grad_output)
        # In place: no second copy of a (vocab x hidden) gradient. A second backward through the same
        # graph (retain_graph) is refused by autograd's version check instead of scaling twice.
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None

    @staticmethod
    def _recompute_backward(ctx, grad_output: torch.Tensor):
        """float16: recompute each chunk's logits and scale d(loss)/d(logits) by grad_output/count in
        float32 before casting it for the matmuls, as the plain loss's backward does."""
        hidden, weight, labels, count = ctx.saved_tensors
        mm, precision, chunk = ctx.matmul_dtype, ctx.precision, ctx.chunk
        valid = labels != IGNORE_INDEX
        scale = grad_output.to(precision) / count
        w = weight.detach().to(mm)  # autocast's cast of the weight, made once (as its cache does)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=precision) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].detach().to(mm)
            y, keep = labels[start:start + chunk], valid[start:start + chunk]
            logits = (h @ w.t()).to(precision)
            grad = _logits_grad(logits, y, keep.to(precision) * scale).to(mm)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ w
            if grad_weight is not None:
                grad_weight += grad.t() @ h
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against labels (-100: ignored), chunk rows at a time.

    hidden (N, d), weight (V, d), labels (N,); 0 when every label is ignored, never NaN.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk)
