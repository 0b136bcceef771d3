"""The LM head and cross-entropy a chunk of tokens at a time, gradients included.

The usual loss materialises (tokens x vocab) logits, in float32 for the softmax: 8 x 2048
tokens with Llama-3's 128k vocabulary is 8.6 GB, usually the largest activation of a step.
`chunked_cross_entropy` never holds more than `chunk` rows of logits. It computes each chunk's
gradient with respect to the hidden states and the head weight during the forward pass, as
Liger-Kernel's fused linear cross-entropy does, so backward has nothing to recompute: the
same matmul FLOPs as the plain loss, and memory that no longer grows with the vocabulary.
Written here (about 60 lines of PyTorch) rather than taken from Liger, whose Triton kernels
would tie training to CUDA; this runs wherever PyTorch does.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        # softmax precision: float32 at least (bf16/fp16 matmul outputs are upcast), float64 stays
        precision = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        total = torch.zeros((), device=hidden.device, dtype=precision)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=precision) if weight.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, y, keep = hidden[start:start + chunk], labels[start:start + chunk], valid[start:start + chunk]
            raw = h @ weight.t()  # under autocast a bf16 matmul; the softmax is float32 either way
            logits = raw.to(precision)
            target = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            total += torch.where(keep, torch.logsumexp(logits, dim=-1) - target, 0.0).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(mean loss)/d(logits) = (softmax - one_hot(label)) / count, zero on ignored rows; in the
            # matmul's dtype, as autograd would hand it to the plain loss's matmul backward
            grad = torch.softmax(logits, dim=-1)
            grad.scatter_add_(1, y.clamp(min=0)[:, None], torch.full_like(target, -1.0)[:, None])
            grad = (grad * (keep.to(precision) / count)[:, None]).to(raw.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ weight.to(raw.dtype)
            if grad_weight is not None:
                grad_weight += grad.t() @ h.to(raw.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # In place: no second copy of a (vocab x hidden) gradient. A second backward through the same
        # graph (retain_graph) is refused by autograd's version check instead of scaling twice.
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against labels (-100: ignored), chunk rows at a time.

    hidden (N, d), weight (V, d), labels (N,); 0 when every label is ignored, never NaN.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk)
