"""Cross-entropy of a linear head over chunks of token rows: one chunk's logits exist at a time.

``chunked_linear_cross_entropy(hidden, weight, bias, target, ...)`` equals
``F.cross_entropy(post(F.linear(hidden, weight, bias)), target, ...)`` for the elementwise ``post`` ops a
model applies to its logits (an upcast, a soft-cap's divide, tanh and multiply). Each chunk's logits are
computed, reduced to its summed loss, and differentiated at once by autograd on that chunk alone, so the
forward holds at most one chunk's logits, log-softmax and gradient; what is kept for backward is the
hidden states, the targets and the gradients of the inputs.

Exactness. The gradient of each row comes from the same ATen kernels as in the unchunked graph (the loss's
``grad / total_weight``, log-softmax's and the ops' backward, the linear's backward on that row), so the
hidden states' gradient is bitwise the unchunked one where a matmul on a chunk of rows computes each row as
the whole matmul does (row cuts at multiples of 64 on CPU). The weight's (and bias's) gradient is a sum over
chunks and the loss a sum of chunk sums: equal within float rounding, not bitwise. Gradients are computed in
the forward for an incoming gradient of 1 (``loss.backward()``); any other incoming gradient (a loss scaled
for accumulation, ``num_items_in_batch``) recomputes each chunk in backward, with the same kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["ChunkSpec", "chunk_bounds", "chunked_linear_cross_entropy"]


@dataclass(frozen=True)
class ChunkSpec:
    """How to compute one head call's loss over chunks.

    Args:
        chunk_rows (int): rows per chunk (the last may be shorter).
        post (Sequence[Callable]): elementwise ops applied to the logits, in order.
        ignore_index (int): target value that contributes nothing.
        reduction (str): ``"mean"`` (over the targets not ignored) or ``"sum"``.
        autocast (tuple[str, bool, torch.dtype]): device type, enabled and dtype of the autocast state the
            head ran under, replayed by a recompute in backward.
    """

    chunk_rows: int
    post: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
    ignore_index: int = -100
    reduction: str = "mean"
    autocast: tuple[str, bool, torch.dtype] = ("cpu", False, torch.bfloat16)


def chunk_bounds(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk."""
    return [(start, min(rows, start + chunk_rows)) for start in range(0, rows, chunk_rows)]


def _loss_of(spec: ChunkSpec, linear, target):
    """The summed loss of one chunk from the linear's output (the post ops applied first)."""
    logits = linear
    for op in spec.post:
        logits = op(logits)
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=spec.ignore_index, reduction="sum")


def _chunks(spec: ChunkSpec, hidden, weight, bias, target, needs, grad_loss, divisor):
    """One pass over the chunks: the summed loss, and the gradients of (hidden, weight, bias) of the loss for an
    incoming ``grad_loss`` (None where not needed), the loss being the sum over ``divisor`` (or the sum, when
    None). Each chunk's logits exist only while it is processed; the weight's gradient is accumulated in place
    from each chunk's logit gradient, so it exists once."""
    device_type, enabled, dtype = spec.autocast
    total = scale = None
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = torch.zeros_like(weight) if needs[1] else None
    grad_bias = torch.zeros_like(bias) if bias is not None and needs[2] else None
    for start, end in chunk_bounds(hidden.shape[0], spec.chunk_rows):
        rows = hidden[start:end].detach().requires_grad_(needs[0])
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            # The parameters go in detached: their gradients are accumulated below, not per chunk by autograd.
            linear = torch.nn.functional.linear(rows, weight.detach(), None if bias is None else bias.detach())
            if not linear.requires_grad and any(needs):
                linear = linear.detach().requires_grad_(True)
            loss = _loss_of(spec, linear, target[start:end])
        total = loss.detach() if total is None else total + loss.detach()
        if any(needs):
            if scale is None:
                # As nll_loss's backward scales it for a mean: grad / total weight, in the loss's dtype.
                grad = grad_loss.to(loss.dtype)
                scale = grad / divisor.to(loss.dtype) if divisor is not None else grad
            # The hidden rows' gradient from the same kernels as the unchunked graph; the logits' for the rest.
            wanted = ([rows] if needs[0] else []) + ([linear] if needs[1] or grad_bias is not None else [])
            got = iter(torch.autograd.grad(loss, wanted, grad_outputs=scale))
            if needs[0]:
                grad_hidden[start:end] = next(got)
            if needs[1] or grad_bias is not None:
                grad_linear = next(got)
                if needs[1]:
                    grad_weight.addmm_(grad_linear.t().to(grad_weight.dtype), rows.detach().to(grad_weight.dtype))
                if grad_bias is not None:
                    grad_bias.add_(grad_linear.sum(0).to(grad_bias.dtype))
                del grad_linear
        del loss, linear, rows
    return total, (grad_hidden, grad_weight, grad_bias)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, spec: ChunkSpec):
        needs = tuple(ctx.needs_input_grad[:3])
        divisor = (target != spec.ignore_index).sum() if spec.reduction == "mean" else None
        # Gradients for the common case, loss.backward(): an incoming gradient of 1.
        one = torch.ones((), device=hidden.device)
        total, grads = _chunks(spec, hidden, weight, bias, target, needs, one, divisor)
        ctx.spec, ctx.needs, ctx.has_bias, ctx.divisor = spec, needs, bias is not None, divisor
        ctx.precomputed = grads if any(needs) else None
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), target)
        return total / divisor.to(total.dtype) if divisor is not None else total

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        if ctx.precomputed is not None and _is_one(grad_loss):
            grads = ctx.precomputed
        else:
            grads = _chunks(ctx.spec, hidden, weight, bias, target, ctx.needs, grad_loss, ctx.divisor)[1]
        ctx.precomputed = None
        return grads[0], grads[1], grads[2], None, None


def _is_one(grad: torch.Tensor) -> bool:
    """Whether the incoming gradient is 1. A fake tensor (planning without weights) has no value to read; its
    bytes and FLOPs are the common case's."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(grad) or bool((grad == 1).all())


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 target: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    """``F.cross_entropy(post(F.linear(hidden, weight, bias)), target)`` over chunks of rows (module docstring).

    Args:
        hidden (torch.Tensor): ``(rows, hidden)`` inputs of the head.
        weight (torch.Tensor): ``(vocab, hidden)`` head weight.
        bias (torch.Tensor | None): ``(vocab,)`` head bias.
        target (torch.Tensor): ``(rows,)`` class indices.
        spec (ChunkSpec): chunking, post ops, ignore index, reduction and autocast state.

    Returns:
        torch.Tensor: the scalar loss.
    """
    if hidden.dim() != 2 or target.dim() != 1 or target.shape[0] != hidden.shape[0]:
        raise ValueError(f"chunked cross-entropy needs (rows, hidden) inputs and (rows,) targets, got "
                         f"{tuple(hidden.shape)} and {tuple(target.shape)}")
    if spec.reduction not in ("mean", "sum"):
        raise ValueError(f"chunked cross-entropy reduces by 'mean' or 'sum', got {spec.reduction!r}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, spec)
