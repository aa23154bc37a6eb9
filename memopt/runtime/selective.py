"""Selective recompute: keep the outputs of a unit's expensive ops, rerun only its cheap ones.

In forward, ``ExpensiveOutputs`` records the output of every matmul, attention and convolution the unit
runs (and the RNG state right after it). In the replay that rebuilds the unit's saved tensors, the same
mode hands those outputs back in the same order instead of computing them, so only the memory-bound ops
(norms, activations, elementwise products, rotary embeddings, dropout) run again. Restoring the RNG
state after each skipped op keeps the random ops that follow it (dropout) drawing the same numbers.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["EXPENSIVE_OPS", "ExpensiveOutputs", "is_expensive"]

_aten = torch.ops.aten
_NAMES = (
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "_int_mm", "convolution", "_convolution", "cudnn_convolution",
    "mkldnn_convolution", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "_flash_attention_forward",
    "_efficient_attention_forward",
)
#: Ops whose cost grows with a matmul's FLOPs: worth keeping their outputs rather than recomputing them.
EXPENSIVE_OPS = frozenset(getattr(_aten, name) for name in _NAMES if hasattr(_aten, name))


def is_expensive(func) -> bool:
    return func.overloadpacket in EXPENSIVE_OPS


def _signature(func, args, kwargs) -> tuple:
    """The op and its tensor inputs' shapes, dtypes and devices: what must match for a recorded output to serve."""
    inputs = tuple((tuple(t.shape), t.dtype, t.device) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
    return func, inputs


def _show(signature: tuple) -> str:
    func, inputs = signature
    shown = ", ".join(f"{list(shape)} {str(dtype).replace('torch.', '')}" for shape, dtype, _ in inputs)
    return f"{func}({shown})"


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


class ExpensiveOutputs(TorchDispatchMode):
    """Record expensive ops' outputs in forward; serve them back, in order, in a replay.

    Args:
        device (torch.device): the unit's device, whose RNG state is captured after each expensive op.
        recorded (list | None): the outputs recorded by the forward; None to record.
        unit (str, default "?"): the unit's name, for error messages.
    """

    def __init__(self, device: torch.device, recorded: list | None = None, unit: str = "?") -> None:
        super().__init__()
        self.device = device
        self.unit = unit
        self.replaying = recorded is not None
        self.recorded = [] if recorded is None else recorded
        self.served = 0

    def _rng_state(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not is_expensive(func):
            return func(*args, **(kwargs or {}))
        if self.replaying:
            if self.served >= len(self.recorded):
                raise RuntimeError(f"memopt: the selective replay of unit {self.unit!r} ran more expensive ops than "
                                   f"its forward ({len(self.recorded)}; the next is {func}); its forward must take the "
                                   "same path every time (data-dependent control flow is the usual cause)")
            entry = self.recorded[self.served]
            self.served += 1
            if entry is None:
                # Served to an earlier backward through the same graph (retain_graph): compute it again.
                return func(*args, **(kwargs or {}))
            signature = _signature(func, args, kwargs)
            if entry[2] != signature:
                raise RuntimeError(
                    f"memopt: the selective replay of unit {self.unit!r} ran expensive op #{self.served - 1} as "
                    f"{_show(signature)}, its forward as {_show(entry[2])}; its forward must take the same path every "
                    "time (data-dependent control flow is the usual cause)")
            # Handed over, not kept: an output no saved tensor needs is freed as soon as it is consumed,
            # exactly as in the forward, so the replay holds no more than a plain recompute does.
            self.recorded[self.served - 1] = None
            out, (cpu_rng, cuda_rng), _ = entry
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
            # Fresh aliases: autograd attaches this replay's history to them, never to the recorded tensors.
            return tree_map(_detach, out)
        out = func(*args, **(kwargs or {}))
        self.recorded.append((tree_map(_detach, out), self._rng_state(), _signature(func, args, kwargs)))
        return out

    def nbytes(self) -> int:
        """Bytes of the distinct storages recorded."""
        seen: dict[int, int] = {}
        for out, _, _ in filter(None, self.recorded):
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    seen[leaf.untyped_storage()._cdata] = leaf.untyped_storage().nbytes()
        return sum(seen.values())
