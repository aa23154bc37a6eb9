"""Roofline cost model: the seconds each torch op takes on a ``Hardware``, from its FLOPs and bytes moved.

An op is bound either by arithmetic (``flops / peak_flops_per_s``) or by memory traffic
(``bytes / mem_bytes_per_s``); it takes the larger of the two, and never less than one kernel's
floor. ``RooflineMode`` applies the model to every op that runs under it and keeps a modelled clock,
which the profiler reads instead of the wall clock when it walks a model of fake tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .hardware import Hardware

__all__ = ["Roofline", "RooflineMode", "matmul_seconds", "op_bytes", "op_flops"]

# Ops that launch no kernel: metadata, aliasing and bare allocation (torch.empty writes nothing).
_FREE_OPS = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::detach", "aten::lift_fresh",
    "aten::alias", "aten::_unsafe_view", "aten::set_", "aten::resize_", "aten::size", "aten::stride",
    "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::dim",
    "aten::is_contiguous", "aten::_local_scalar_dense",
}


@dataclass(frozen=True)
class Roofline:
    """Seconds of one op on ``hardware``.

    Args:
        hardware (Hardware): the accelerator modelled (``peak_flops_per_s`` at the training dtype,
            ``mem_bytes_per_s``).
        kernel_floor_s (float, default 2e-6): shortest time any kernel takes, seconds (launch and tail).
        fp32_matmul_fraction (float, default 0.5): share of ``peak_flops_per_s`` a float32 matmul gets
            (TF32 tensor cores run at half the bf16 rate on A100/H100-class parts).
    """

    hardware: Hardware
    kernel_floor_s: float = 2e-6
    fp32_matmul_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.hardware, Hardware):
            raise ValueError(f"Roofline.hardware must be a memopt.Hardware, got {self.hardware!r}; "
                             "use Hardware.preset('h100')")
        if not self.kernel_floor_s >= 0:
            raise ValueError(f"kernel_floor_s must be >= 0 seconds, got {self.kernel_floor_s!r}; e.g. 2e-6")
        if not 0 < self.fp32_matmul_fraction <= 1:
            raise ValueError(f"fp32_matmul_fraction must be in (0, 1], got {self.fp32_matmul_fraction!r}; e.g. 0.5")

    def seconds(self, flops: float, bytes_moved: float, fp32: bool = False, attention: bool = False) -> float:
        """Roofline time of one kernel, at the shares of the peaks such kernels reach (``Hardware``'s
        ``matmul_efficiency``, ``attention_efficiency`` and ``memory_efficiency``).

        Args:
            flops (float): floating-point operations the kernel does.
            bytes_moved (float): bytes it reads and writes in device memory.
            fp32 (bool, default False): the arithmetic runs in float32 (slower matmul peak).
            attention (bool, default False): a fused attention kernel.
        """
        hw = self.hardware
        efficiency = hw.attention_efficiency if attention else hw.matmul_efficiency
        peak = hw.peak_flops_per_s * efficiency * (self.fp32_matmul_fraction if fp32 else 1.0)
        return max(flops / peak, bytes_moved / (hw.mem_bytes_per_s * hw.memory_efficiency), self.kernel_floor_s)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def op_bytes(args, kwargs, out) -> int:
    """Bytes an op reads (tensor arguments) and writes (tensor results), by their logical size."""
    return sum(_tensor_bytes(t) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))


def _bound(func, args, kwargs) -> dict:
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs or {})
    return bound


def _attention_flops(func, args, kwargs) -> float:
    """FLOPs of a fused attention op on (batch, heads, tokens, head dim) tensors.

    The forward does two matmuls (QK^T and PV); a flash-style backward five (it recomputes QK^T). A
    causal mask skips half of each, as the fused kernels do.
    """
    bound = _bound(func, args, kwargs)
    query, key, value = bound.get("query"), bound.get("key"), bound.get("value")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return 0.0
    batch, heads, q_len, head_dim = query.shape
    k_len, v_dim = key.shape[-2], value.shape[-1]
    forward = 2.0 * batch * heads * q_len * k_len * (head_dim + v_dim)
    flops = forward * 2.5 if "backward" in func._schema.name else forward
    return flops * 0.5 if bound.get("is_causal") else flops


def op_flops(func, args, kwargs, out) -> float:
    """Floating-point operations of one aten op: matmuls, convolutions and fused attention.

    Other ops count 0: they are memory-bound and the roofline times them by bytes.
    """
    name = func._schema.name
    if name.startswith("aten::_scaled_dot_product") and "attention" in name:
        return _attention_flops(func, args, kwargs)
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0.0
    return float(formula(*args, **(kwargs or {}), out_val=out))


class RooflineMode(TorchDispatchMode):
    """Costs every op that runs under it with a ``Roofline`` and advances a modelled clock.

    Works on real and fake tensors alike; only shapes and dtypes are read.

    Args:
        roofline (Roofline): the cost model.

    Example:
        >>> from memopt.hardware import Hardware
        >>> with RooflineMode(Roofline(Hardware.preset("h100"))) as mode:
        ...     _ = torch.ones(512, 512) @ torch.ones(512, 512)
        >>> mode.flops
        268435456.0
    """

    def __init__(self, roofline: Roofline) -> None:
        super().__init__()
        self.roofline = roofline
        self.elapsed_s = 0.0
        self.flops = 0.0
        self.bytes_moved = 0
        self.kernels = 0

    def clock(self) -> float:
        """Modelled seconds so far."""
        return self.elapsed_s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.name in _FREE_OPS or func._schema.name.startswith("prim::"):
            return out
        flops = op_flops(func, args, kwargs, out)
        nbytes = op_bytes(args, kwargs, out)
        first = next((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)
        fp32 = first is not None and first.dtype == torch.float32
        attention = func._schema.name.startswith("aten::_scaled_dot_product") or "attention" in func._schema.name
        self.elapsed_s += self.roofline.seconds(flops, nbytes, fp32, attention)
        self.flops += flops
        self.bytes_moved += nbytes
        self.kernels += 1
        return out


def matmul_seconds(roofline: Roofline, m: int, k: int, n: int, itemsize: int = 2) -> float:
    """Roofline seconds of one (m x k) @ (k x n) matmul; a reference for tests and reports."""
    return roofline.seconds(2.0 * m * k * n, itemsize * (m * k + k * n + m * n), fp32=itemsize == 4)

