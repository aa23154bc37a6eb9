"""The LM head as a unit: arm ``model.get_output_embeddings()`` so that the loss is computed over chunks of rows.

``HeadChunking(model, chunk_rows)`` replaces the head module's instance ``forward`` (restored by ``remove``):
a training forward (train mode, gradients on) returns ``LazyLogits``, which the model's own loss turns into a
chunked cross-entropy; eval and no-grad forwards (``generate``) return the logits as always. The model's
output then carries ``logits=None`` when its loss consumed them (Liger's convention: the logits of every
token never existed); without a loss of its own they stay lazy for the caller's loss. A head
memopt cannot chunk exactly (not a plain ``nn.Linear``, a quantized or partitioned weight) is refused by
``find_head`` with the reason, and the model trains as without chunking.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .lazy_logits import HeadCall, LazyLogits

__all__ = ["HeadChunking", "find_head"]


def find_head(model: nn.Module) -> tuple[nn.Linear | None, str]:
    """The model's LM head when memopt can chunk it, else None and the reason in a few words."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        return None, "the model has no output embeddings (get_output_embeddings)"
    if type(head) is not nn.Linear:
        return None, f"its head is a {type(head).__name__}, not a plain nn.Linear"
    if hasattr(head.weight, "ds_id"):
        return None, "its head weight is partitioned by DeepSpeed ZeRO-3"
    if not head.weight.is_floating_point():
        return None, f"its head weight is {head.weight.dtype}, not a floating-point tensor"
    return head, ""


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


class HeadChunking:
    """Arm a model's head while installed.

    Args:
        model (nn.Module): the model (its output's ``logits`` become None in training forwards).
        chunk_rows (int): rows per chunk of the loss.
        on_loss (Callable | None): passed to every ``HeadCall`` (the profiler's recorder).

    Raises:
        ValueError: the model's head cannot be chunked (``find_head``'s reason).
    """

    def __init__(self, model: nn.Module, chunk_rows: int, on_loss: Callable | None = None) -> None:
        head, reason = find_head(model)
        if head is None:
            raise ValueError(f"memopt cannot chunk {type(model).__name__}'s LM head: {reason}")
        self.model, self.head, self.chunk_rows, self.on_loss = model, head, chunk_rows, on_loss
        self.notes: list[str] = []
        self.calls = 0
        self._saved = None
        self._hook = None

    def install(self) -> None:
        head = self.head
        self._saved = head.__dict__.get("forward", _MISSING)
        original = head.forward

        def forward(x: torch.Tensor, *args, **kwargs):
            if args or kwargs or not (head.training and torch.is_grad_enabled()) or torch.is_inference_mode_enabled():
                return original(x, *args, **kwargs)
            self.calls += 1
            state = _autocast_state(x.device)
            call = HeadCall(x, head.weight, head.bias, state, self.chunk_rows, self.on_loss, self.notes)
            dtype = state[2] if state[1] else torch.result_type(x, head.weight)
            return LazyLogits(call, (*x.shape[:-1], head.out_features), dtype)

        head.forward = forward
        self._hook = self.model.register_forward_hook(_drop_lazy_logits)

    def remove(self) -> None:
        if self._saved is None:
            return
        if self._saved is _MISSING:
            self.head.__dict__.pop("forward", None)
        else:
            self.head.forward = self._saved
        self._saved = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


_MISSING = object()


def _drop_lazy_logits(_module, _args, output):
    """The model's output with ``logits=None`` where its own loss consumed lazy logits: they were never computed
    for all tokens. Without a loss in the output they stay lazy, for the caller's loss (``MemoptConfig.loss_fn``)
    to chunk or materialise."""
    if isinstance(output, tuple):
        has_loss = bool(output) and isinstance(output[0], torch.Tensor) and output[0].dim() == 0
        return tuple(None if has_loss and isinstance(x, LazyLogits) else x for x in output)
    logits = getattr(output, "logits", None)
    if isinstance(logits, LazyLogits) and getattr(output, "loss", None) is not None:
        output.logits = None
    return output
