"""``LazyLogits``: what an armed LM head returns instead of its logits, until a loss asks for them.

A language model computes ``logits = lm_head(hidden)``, perhaps soft-caps them (divide, tanh, multiply),
upcasts them and hands them to ``F.cross_entropy`` (Hugging Face's ``ForCausalLMLoss``, T5's
``CrossEntropyLoss``). ``LazyLogits`` has the logits' shape, dtype and device but no data: it records the
elementwise ops and the views applied to it (``__torch_function__``, before autograd), and when
``F.cross_entropy`` receives it, the loss is computed over chunks of rows by
``chunked_linear_cross_entropy``, so the logits never exist for all tokens at once. Anything else done with
it (reading values, an op it does not know) materialises the logits exactly as the model would have, with
their autograd history, and is noted: the step is then as it would be without chunking.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from torch.utils._pytree import tree_leaves, tree_map

from .chunked_loss import ChunkSpec, chunked_linear_cross_entropy

__all__ = ["HeadCall", "LazyLogits"]

_CASTS = {torch.Tensor.float: torch.float32, torch.Tensor.double: torch.float64, torch.Tensor.half: torch.float16,
          torch.Tensor.bfloat16: torch.bfloat16}
_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten}
_SCALAR_OPS = {torch.Tensor.__truediv__: torch.div, torch.Tensor.div: torch.div, torch.div: torch.div,
               torch.Tensor.__mul__: torch.mul, torch.Tensor.__rmul__: torch.mul, torch.Tensor.mul: torch.mul,
               torch.mul: torch.mul}
_UNARY = {torch.tanh: torch.tanh, torch.Tensor.tanh: torch.tanh}


@dataclass
class HeadCall:
    """One call of an armed head: its inputs, and what happens to them.

    Args:
        hidden (torch.Tensor): the head's input, ``(..., hidden)``.
        weight (torch.Tensor): the head's weight, ``(vocab, hidden)``.
        bias (torch.Tensor | None): its bias.
        autocast (tuple[str, bool, torch.dtype]): the autocast state the head was called under.
        chunk_rows (int): rows per chunk of the loss.
        on_loss (Callable | None): called with the call and the loss's target and keyword arguments instead
            of chunking (the profiler records them, then the logits are materialised).
        notes (list[str]): why the logits were materialised, if they were.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    autocast: tuple[str, bool, torch.dtype]
    chunk_rows: int
    on_loss: Callable | None = None
    notes: list[str] = field(default_factory=list)

    def logits(self) -> torch.Tensor:
        device_type, enabled, dtype = self.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return F.linear(self.hidden, self.weight, self.bias)


class LazyLogits(torch.Tensor):
    """The logits of a ``HeadCall`` with ``post`` ops applied, viewed as ``shape``; computed only on demand."""

    call: HeadCall
    post: tuple[Callable[[torch.Tensor], torch.Tensor], ...]

    @staticmethod
    def __new__(cls, call: HeadCall, shape: tuple[int, ...], dtype: torch.dtype,
                post: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()):
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=call.hidden.device)
        out.call, out.post = call, post
        return out

    def __repr__(self) -> str:  # noqa: D105 - no data to show until materialised
        return f"LazyLogits(shape={tuple(self.shape)}, dtype={self.dtype}, post={len(self.post)} ops)"

    def materialize(self) -> torch.Tensor:
        """The logits as the model would have had them, with autograd history."""
        logits = self.call.logits()
        for op in self.post:
            logits = op(logits)
        return logits.reshape(self.shape)

    def _with(self, shape=None, dtype=None, op=None) -> LazyLogits:
        return LazyLogits(self.call, tuple(self.shape) if shape is None else shape, dtype or self.dtype,
                          self.post + ((op,) if op is not None else ()))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__" or func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        lazy = args[0] if args and isinstance(args[0], LazyLogits) else None
        if lazy is not None:
            out = lazy._lazy(func, args[1:], kwargs)
            if out is not None:
                return out
        if func is F.cross_entropy:
            out = _loss(args, kwargs)
            if out is not None:
                return out
        calls = {id(a.call): a.call for a in tree_leaves((args, kwargs)) if isinstance(a, LazyLogits)}
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        for call in calls.values():
            call.notes.append(f"the logits were used by {name}, so they were computed whole")
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, LazyLogits) else a, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"memopt: lazy logits reached {func} below autograd; please report this with the "
                           "model's name (MemoptConfig(head='off') trains without chunking the head)")

    def _lazy(self, func, args, kwargs) -> LazyLogits | None:
        """The lazy result of ``func`` on ``self``, or None when it needs the values."""
        if func in _CASTS and not args and not kwargs:
            dtype = _CASTS[func]
            return self._with(dtype=dtype, op=lambda x, dtype=dtype: x.to(dtype))
        if func is torch.Tensor.to:
            dtype = _target_dtype(self, args, kwargs)
            if dtype is not None:
                return self._with(dtype=dtype, op=lambda x, dtype=dtype: x.to(dtype))
            return None
        if func is torch.Tensor.contiguous and not args:
            return self
        if func in _VIEWS:
            shape = _view_shape(self, func, args, kwargs)
            return self._with(shape=shape) if shape is not None else None
        if func in _SCALAR_OPS and len(args) == 1 and isinstance(args[0], (int, float)) and not kwargs:
            scalar, op = args[0], _SCALAR_OPS[func]
            return self._with(op=lambda x, op=op, scalar=scalar: op(x, scalar))
        if func in _UNARY and not args and not kwargs:
            op = _UNARY[func]
            return self._with(op=op)
        return None


_METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.ndimension,
             torch.Tensor.is_floating_point, torch.Tensor.__len__, torch.Tensor.element_size, torch.Tensor.get_device}


def _target_dtype(lazy: LazyLogits, args, kwargs) -> torch.dtype | None:
    """The dtype of ``lazy.to(...)`` when it only casts (the device and everything else unchanged)."""
    values = [*args, *kwargs.values()]
    dtypes = [v for v in values if isinstance(v, torch.dtype)]
    others = [v for v in values if not isinstance(v, torch.dtype)
              and not (isinstance(v, (str, torch.device)) and torch.device(v) == lazy.device)
              and v is not False]
    return dtypes[0] if len(dtypes) == 1 and not others else None


def _view_shape(lazy: LazyLogits, func, args, kwargs) -> tuple[int, ...] | None:
    """The new shape when a view only merges or splits the leading (token) dims and keeps the vocab last."""
    if func in (torch.Tensor.flatten, torch.flatten):
        start = kwargs.get("start_dim", args[0] if args else 0)
        end = kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        if end % lazy.dim() == lazy.dim() - 1 or kwargs.keys() - {"start_dim", "end_dim"}:
            return None
        dims = list(lazy.shape)
        start, end = start % lazy.dim(), end % lazy.dim()
        shape = dims[:start] + [math.prod(dims[start:end + 1])] + dims[end + 1:]
    else:
        if kwargs:
            return None
        sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
        if not all(isinstance(s, int) for s in sizes):
            return None
        shape = list(sizes)
        if shape.count(-1) > 1:
            return None
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            if known == 0 or lazy.numel() % known:
                return None
            shape[shape.index(-1)] = lazy.numel() // known
    vocab = lazy.shape[-1]
    if not shape or shape[-1] != vocab or math.prod(shape) != lazy.numel():
        return None
    return tuple(shape)


def _loss(args, kwargs) -> torch.Tensor | None:
    """``F.cross_entropy`` of lazy ``(rows, vocab)`` logits over chunks, or None when the call asks for more."""
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    logits, target = bound.get("input"), bound.get("target")
    if (not isinstance(logits, LazyLogits) or logits.dim() != 2 or not isinstance(target, torch.Tensor)
            or isinstance(target, LazyLogits) or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32)
            or bound.get("weight") is not None or bound.get("size_average") is not None
            or bound.get("reduce") is not None or bound.get("label_smoothing", 0.0) != 0.0
            or bound.get("reduction", "mean") not in ("mean", "sum")):
        return None
    call = logits.call
    hidden = call.hidden.reshape(-1, call.hidden.shape[-1])
    if hidden.shape[0] != logits.shape[0]:
        return None
    spec = ChunkSpec(call.chunk_rows, logits.post, int(bound.get("ignore_index", -100)),
                     bound.get("reduction", "mean"), call.autocast)
    if call.on_loss is not None:
        call.on_loss(call, hidden, target, spec)
        return F.cross_entropy(logits.materialize(), target, ignore_index=spec.ignore_index, reduction=spec.reduction)
    return chunked_linear_cross_entropy(hidden, call.weight, call.bias, target.long(), spec)
