"""Measure the LM head and its loss: the model's own head, and the same over chunks of token rows.

During the profiled step the head is armed in record mode (``HeadCapture``): its call returns lazy logits,
and when the model's loss asks for them the call's inputs, the ops the model applied to the logits and the
loss's arguments are kept (outside the memory meter), then the logits are computed whole, exactly as the
model computes them. After the step, ``profile_head`` runs the head and its loss, forward and backward, on
those inputs: once as the model does (1 chunk), then over 2, 4, 8, ... chunks of rows at multiples of
``row_multiple``, each under a fresh memory meter and the profiler's clock. The options' bytes and seconds
are what the planner trades (``TrainingGraph.head``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from .graph import HeadOption, HeadProfile
from .meter import MemoryMeter
from .runtime.chunked_loss import ChunkSpec, chunked_linear_cross_entropy
from .runtime.lazy_logits import HeadCall

__all__ = ["HeadCapture", "chunk_options", "profile_head"]

#: Chunk counts tried (those whose chunks are at least ``row_multiple`` rows and differ).
CHUNK_COUNTS = (2, 4, 8, 16, 32)


class HeadCapture:
    """Keep the first head call's inputs and loss arguments of a profiled step.

    Args:
        meter (MemoryMeter): the step's meter; paused while the inputs are copied, so the copies never count.
    """

    def __init__(self, meter: MemoryMeter) -> None:
        self.meter = meter
        self.call: HeadCall | None = None
        self.hidden: torch.Tensor | None = None
        self.target: torch.Tensor | None = None
        self.spec: ChunkSpec | None = None

    def __call__(self, call: HeadCall, hidden: torch.Tensor, target: torch.Tensor, spec: ChunkSpec) -> None:
        if self.call is not None:
            return
        self.meter.paused = True
        try:
            self.call, self.spec = call, spec
            self.hidden, self.target = hidden.detach().clone(), target.detach().clone()
        finally:
            self.meter.paused = False


def chunk_options(rows: int, row_multiple: int) -> list[tuple[int, int]]:
    """``(chunks, chunk_rows)`` tried for ``rows`` token rows: chunks at multiples of ``row_multiple`` rows."""
    out, seen = [], {rows}
    for count in CHUNK_COUNTS:
        chunk_rows = max(row_multiple, math.ceil(rows / count / row_multiple) * row_multiple)
        if chunk_rows not in seen and chunk_rows < rows:
            seen.add(chunk_rows)
            out.append((math.ceil(rows / chunk_rows), chunk_rows))
    return out


def _loss(capture: HeadCapture, hidden: torch.Tensor, chunk_rows: int | None) -> torch.Tensor:
    """The head's loss; ``chunk_rows`` None is the model's own way. The logits die with this frame, before the
    backward, as the model's output (which holds them) dies before ``loss.backward()`` in a training loop."""
    call, spec = capture.call, capture.spec
    if chunk_rows is not None:
        spec = ChunkSpec(chunk_rows, spec.post, spec.ignore_index, spec.reduction, spec.autocast)
        return chunked_linear_cross_entropy(hidden, call.weight, call.bias, capture.target, spec)
    device_type, enabled, dtype = spec.autocast
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        logits = F.linear(hidden, call.weight, call.bias)
    for op in spec.post:
        logits = op(logits)
    return F.cross_entropy(logits, capture.target, ignore_index=spec.ignore_index, reduction=spec.reduction)


def _run(capture: HeadCapture, chunk_rows: int | None) -> None:
    """The head and its loss, forward and backward."""
    call = capture.call
    hidden = capture.hidden.detach().requires_grad_(call.hidden.requires_grad)
    wanted = [t for t in (hidden, call.weight, call.bias) if t is not None and t.requires_grad]
    loss = _loss(capture, hidden, chunk_rows)
    if wanted:
        torch.autograd.grad(loss, wanted)


def _measure(capture: HeadCapture, chunk_rows: int | None, clock: Callable[[], float],
             sync: Callable[[], None]) -> tuple[int, float]:
    seconds = []
    for _ in range(2):
        with MemoryMeter() as meter:
            sync()
            start = clock()
            _run(capture, chunk_rows)
            sync()
            seconds.append(clock() - start)
    return meter.peak_bytes, min(seconds)


def profile_head(capture: HeadCapture, row_multiple: int, clock: Callable[[], float],
                 sync: Callable[[], None]) -> HeadProfile:
    """The head's options, measured on the captured call (module docstring).

    Args:
        capture (HeadCapture): a capture that saw the head's loss.
        row_multiple (int): chunks are multiples of this many rows.
        clock (Callable[[], float]): the profiler's clock (a roofline model's in fake mode).
        sync (Callable[[], None]): waits for the device, before each clock reading.
    """
    rows = capture.hidden.shape[0]
    weight, bias = capture.call.weight, capture.call.bias
    trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    options = [HeadOption(1, rows, *_measure(capture, None, clock, sync))]
    for chunks, chunk_rows in chunk_options(rows, row_multiple):
        options.append(HeadOption(chunks, chunk_rows, *_measure(capture, chunk_rows, clock, sync)))
    return HeadProfile(rows=rows, vocab=weight.shape[0], trained=trained, options=options)
