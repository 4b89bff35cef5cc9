"""Token-weighted cross-entropy, plain and fused with the output projection.

The loss of an optimizer step is the sum of the per-token cross-entropies over every trained
token (label != -100) of every micro-batch on every rank, divided by the number of those
tokens. Each micro-batch therefore returns its *sum* times `scale` = 1 / (global token count),
never its own mean: a mean of micro-batch means weights short micro-batches (few trained
tokens, e.g. with --response-only) too heavily, which is the known accumulation bug.

`fused_linear_cross_entropy` computes `hidden @ weight.T` chunk by chunk, turns each chunk of
logits straight into its loss and its gradients, and frees it: the full (tokens x vocab) fp32
logits (8 GiB for 16k tokens of Llama 3's 128k vocabulary) never exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the fp32 cross-entropies of the trained tokens. logits (N, V), labels (N,)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _FusedLinearCE(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) * scale, with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, chunk_size):  # type: ignore[override]
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = (h @ weight.t()).float()
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
            # d loss / d logits = softmax - one_hot, zero on ignored rows, times scale.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            grad.mul_((valid.to(grad.dtype) * scale).unsqueeze(1))
            grad = grad.to(hidden.dtype)
            grad_h[start : start + chunk_size] = grad @ weight
            grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype),
            grad_w * grad_out.to(grad_w.dtype),
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """`scale * sum CE(hidden @ weight.T, labels)` without materialising all logits.

    hidden (N, H), weight (V, H), labels (N,) with -100 for untrained positions.
    """
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=hidden.device)
    return _FusedLinearCE.apply(hidden, weight, labels, scale.float(), chunk_size)
