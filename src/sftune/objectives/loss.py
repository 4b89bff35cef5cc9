"""Token-weighted cross-entropy, plain and fused with the output projection.

The loss of an optimizer step is the sum of the per-token cross-entropies over every trained
token (label != -100) of every micro-batch on every rank, divided by the number of those
tokens. Each micro-batch therefore returns its *sum* times `scale` = 1 / (global token count),
never its own mean: a mean of micro-batch means weights short micro-batches (few trained
tokens, e.g. with --response-only) too heavily, which is the known accumulation bug.

`fused_linear_cross_entropy` computes `hidden @ weight.T` chunk by chunk, turns each chunk of
logits straight into its loss and its gradients, and frees it: the full (tokens x vocab) fp32
logits (8 GiB for 16k tokens of Llama 3's 128k vocabulary) never exist.

`fused_linear_token_logprobs` is its per-token form for the preference objectives
(objectives/preference.py): log p(label) of every row, 0 where the label is -100. A pair's loss is
not linear in its tokens' log-probs, so the gradient of a row is known only in backward; the
forward keeps each row's log-sum-exp (N floats) and backward recomputes the logits chunk by
chunk: one GEMM more than the cross-entropy, and still never all the logits at once.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from sftune.data.constants import IGNORE_INDEX


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the loss math: bf16/fp16 go up, fp64 (exact tests) stays."""
    return x if x.dtype == torch.float64 else x.float()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the (at least fp32) cross-entropies of the trained tokens. logits (N, V), labels (N,)."""
    return F.cross_entropy(upcast(logits), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class _FusedLinearCE(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) * scale, with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, chunk_size, chunk_fn):  # type: ignore[override]
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden)
        # One chunk: its weight gradient is a single GEMM in the weight's dtype, as in the plain
        # path. Several: accumulated in fp32 (2 GiB for Llama 3's head, so only when needed).
        single = n <= chunk_size
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # A frozen head (LoRA) needs no weight gradient: one GEMM per chunk saved.
        need_w = weight.requires_grad
        grad_w = (
            None
            if single or not need_w
            else torch.zeros(weight.shape, dtype=acc, device=weight.device)
        )
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]
            chunk_loss, grad = chunk_fn(h @ weight.t(), labels[start : start + chunk_size], scale)
            loss += chunk_loss
            torch.mm(grad, weight, out=grad_h[start : start + chunk_size])
            if not need_w:
                continue
            if single:
                grad_w = grad.t() @ h
            else:
                _accumulate_wgrad(grad_w, grad, h)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_out.to(grad_w.dtype),
            None,
            None,
            None,
            None,
        )


def ce_chunk(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over trained rows, d(scale * that sum) / d logits in the logits' dtype).

    logits (n, V) straight from the matmul; the math runs in fp32. Under `torch.compile` this
    is two fused passes over the logits instead of about ten.
    """
    x = upcast(logits)
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = ((lse.squeeze(1) - x.gather(1, target).squeeze(1)) * valid).sum()
    one_hot = torch.arange(x.shape[1], device=x.device).unsqueeze(0) == target
    # d loss / d logits = softmax - one_hot, zero on ignored rows, times scale.
    grad = (torch.exp(x - lse) - one_hot.to(x.dtype)) * (valid.to(x.dtype) * scale).unsqueeze(1)
    return loss, grad.to(logits.dtype)


@functools.cache
def compiled_ce_chunk():
    """`ce_chunk` under torch.compile (built on first use; sizes are dynamic)."""
    return torch.compile(ce_chunk, dynamic=True)


def _accumulate_wgrad(grad_w: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32) += grad.T @ h. On CUDA one GEMM with an fp32 output accumulates in
    place; elsewhere (or on older torch) via a temporary of the inputs' dtype."""
    global _addmm_out_dtype
    if grad_w.is_cuda and grad.dtype != torch.float32 and _addmm_out_dtype:
        try:
            torch.addmm(grad_w, grad.t(), h, out_dtype=torch.float32, out=grad_w)
            return
        except RuntimeError as e:  # this torch/GPU lacks the mixed-dtype GEMM
            warnings.warn(
                f"fused loss: fp32-output addmm unavailable ({e}); using a temporary", stacklevel=2
            )
            _addmm_out_dtype = False
    grad_w += (grad.t() @ h).to(grad_w.dtype)


_addmm_out_dtype = hasattr(torch.ops.aten.addmm, "dtype_out")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    chunk_size: int = 4096,
    compiled: bool = False,
) -> torch.Tensor:
    """`scale * sum CE(hidden @ weight.T, labels)` without materialising all logits.

    hidden (N, H), weight (V, H), labels (N,) with -100 for untrained positions. `compiled`
    runs each chunk's softmax and gradient as compiled kernels (GPU).
    """
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=hidden.device)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # Evaluation: the loss alone, without the two gradient GEMMs per chunk.
        total = sum(
            cross_entropy_sum(hidden[i : i + chunk_size] @ weight.t(), labels[i : i + chunk_size])
            for i in range(0, hidden.shape[0], chunk_size)
        )
        return total * upcast(scale)
    chunk_fn = compiled_ce_chunk() if compiled else ce_chunk
    return _FusedLinearCE.apply(hidden, weight, labels, upcast(scale), chunk_size, chunk_fn)


class _FusedLinearLogprobs(torch.autograd.Function):
    """log_softmax(h_i @ W^T)[y_i] per row, chunk by chunk; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, compiled):  # type: ignore[override]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logps = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(logps)
        chunk_fn = compiled_logprob_chunks()[0] if compiled else logprob_chunk
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logps[rows], lse[rows] = chunk_fn(hidden[rows] @ weight.t(), labels[rows])
        ctx.chunk_size, ctx.compiled = chunk_size, compiled
        ctx.save_for_backward(hidden, weight, labels, lse)
        return logps

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # A frozen head (LoRA) needs no weight gradient: one GEMM per chunk saved.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_fn = compiled_logprob_chunks()[1] if ctx.compiled else logprob_chunk_grad
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            grad = grad_fn(h @ weight.t(), labels[rows], lse[rows], grad_out[rows])
            if need_h:
                torch.mm(grad, weight, out=grad_h[rows])
            if need_w:
                _accumulate_wgrad(grad_w, grad, h)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def logprob_chunk(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) per row, 0 where ignored; log-sum-exp per row), in at least fp32."""
    x = upcast(logits)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return (picked - lse) * (labels != IGNORE_INDEX), lse


def logprob_chunk_grad(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """d(sum_i grad_out_i * logp_i) / d logits = (one_hot - softmax) * grad_out on scored rows,
    in the logits' dtype; softmax from the forward's log-sum-exp."""
    x = upcast(logits)
    one_hot = torch.arange(x.shape[1], device=x.device).unsqueeze(0) == labels.unsqueeze(1)
    g = (grad_out * (labels != IGNORE_INDEX)).to(x.dtype).unsqueeze(1)
    return ((one_hot.to(x.dtype) - torch.exp(x - lse.unsqueeze(1))) * g).to(logits.dtype)


@functools.cache
def compiled_logprob_chunks():
    """`logprob_chunk` and `logprob_chunk_grad` under torch.compile (dynamic sizes)."""
    return (
        torch.compile(logprob_chunk, dynamic=True),
        torch.compile(logprob_chunk_grad, dynamic=True),
    )


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    compiled: bool = False,
) -> torch.Tensor:
    """Per-row `log_softmax(hidden @ weight.T)[labels]` (N,), 0 where labels is -100, in at
    least fp32, without materialising all logits (see the module docstring). `compiled` runs
    each chunk's log-softmax and gradient as compiled kernels (GPU)."""
    return _FusedLinearLogprobs.apply(hidden, weight, labels, chunk_size, compiled)
