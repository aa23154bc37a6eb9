"""Per-call frames that keep, swap or recompute one unit's saved tensors.

Every call of a planned unit runs its forward once, unchanged, under ``saved_tensors_hooks`` whose pack
hook decides, tensor by tensor, what autograd holds: the tensor (keep), a host copy (swap), or nothing
(recompute). The first unpack in backward recomputes what was dropped by running the unit's original
forward again on its held inputs (all of them, or only the dropped token rows of a token-separable
unit) under capturing hooks, with the RNG and autocast state of the forward, and matches the captured
tensors to the dropped ones by pack order, as non-reentrant checkpointing does. The unit's own backward
then runs on full tensors, so gradients equal the unmodified model's.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map

from .._storages import StorageMap
from ..decisions import Mode
from .caches import CacheSnapshots, changed
from .selective import ExpensiveOutputs
from .store import HostEntry

__all__ = ["Frame", "UnitPolicy"]


@dataclass(frozen=True)
class UnitPolicy:
    """What one unit does with its saved tensors (``memopt.api.policy_for`` makes it from a ``Decision``).

    ``mode`` is ``KEEP``, ``SWAP`` (distinct storages whose index is in ``swap_tensors``), ``RECOMPUTE``
    (all), ``SELECTIVE`` (all, replayed with the expensive ops' outputs kept from the forward), or
    ``TOKEN_WISE`` (rows ``[0, keep_rows)`` kept, the next ``swap_rows`` swapped, the rest recomputed;
    ``token_dims`` per distinct storage; ``rows`` the profiled row count).
    """

    mode: Mode
    swap_tensors: frozenset[int] = frozenset()
    keep_rows: int = 0
    swap_rows: int = 0
    rows: int = 0
    token_dims: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))


class _Dropped:
    __slots__ = ("frame", "call")

    def __init__(self, frame: Frame, call: int) -> None:
        self.frame, self.call = frame, call


def _describe(tensor: torch.Tensor) -> tuple:
    """What a recomputed tensor must match: shape, dtype and device (torch.utils.checkpoint checks the same)."""
    return tuple(tensor.shape), tensor.dtype, tensor.device


class _Swapped:
    __slots__ = ("frame", "storage", "dtype", "size", "stride", "offset")

    def __init__(self, frame: Frame, storage: int, tensor: torch.Tensor) -> None:
        self.frame, self.storage = frame, storage
        self.dtype, self.size, self.stride = tensor.dtype, tensor.size(), tensor.stride()
        self.offset = tensor.storage_offset()


class _Rows:
    __slots__ = ("frame", "storage", "shape")

    def __init__(self, frame: Frame, storage: int, shape: torch.Size) -> None:
        self.frame, self.storage, self.shape = frame, storage, shape


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _bytes_view(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage of ``tensor`` as a flat uint8 tensor."""
    return tensor.new_empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())


def row_input_shape(x: torch.Tensor, rows: int) -> tuple[int, ...]:
    """Shape of ``rows`` token rows of ``x`` fed back to the unit: leading dims of 1, then rows, then features."""
    return (1,) * (x.dim() - 2) + (rows, x.shape[-1])


class Frame:
    """State of one forward call of one unit, alive until autograd frees its saved tensors."""

    def __init__(self, runtime, unit_index: int, policy: UnitPolicy, forward, args, kwargs) -> None:
        self.runtime = runtime
        self.unit_index = unit_index
        self.policy = policy
        self.forward = forward
        self.calls = 0
        self.dropped: dict[int, tuple] = {}  # pack call -> (shape, dtype, device) of each tensor dropped
        self.storage_index = StorageMap()  # storage -> its index among the distinct storages saved
        self.distinct = 0
        self.entries: dict[int, object] = {}
        self.recomputed: dict[int, torch.Tensor] | None = None
        self.rows_cache: dict[int, torch.Tensor] = {}
        self.handles: dict[int, int] = {}
        self.started_backward = False
        mode = policy.mode
        self.args = self.kwargs = None
        self.drop_input = None
        self.recorded: list | None = None  # expensive ops' outputs, for a selective replay
        self.caches: CacheSnapshots | None = None
        if mode in (Mode.RECOMPUTE, Mode.SELECTIVE):
            self.args, self.kwargs = args, kwargs
            self.caches = CacheSnapshots(args, kwargs) or None
        elif mode is Mode.TOKEN_WISE:
            x = args[0]
            dropped = policy.rows - policy.keep_rows - policy.swap_rows
            if dropped:
                flat = x.detach().reshape(policy.rows, -1)
                self.drop_input = (flat[policy.rows - dropped:].clone(), x.requires_grad, row_input_shape(x, dropped))
        if mode in (Mode.RECOMPUTE, Mode.SELECTIVE) or self.drop_input is not None:
            self.cpu_rng = torch.get_rng_state()
            self.cuda_rng = None
            device = runtime.device
            if device.type == "cuda" and torch.cuda.is_initialized():
                self.cuda_rng = torch.cuda.get_rng_state(device)
            self.autocast = _autocast_state(device)

    # -- pack ---------------------------------------------------------------------------------------
    def pack(self, tensor: torch.Tensor):
        call = self.calls
        self.calls += 1
        if self.runtime.is_param(tensor):
            return tensor
        storage = tensor.untyped_storage()
        index = self.storage_index.get(storage)
        first = index is None
        if first:
            index = self.distinct
            self.distinct += 1
            self.storage_index.add(storage, index)
        mode = self.policy.mode
        if mode in (Mode.RECOMPUTE, Mode.SELECTIVE):
            self.dropped[call] = _describe(tensor)
            return _Dropped(self, call)
        if mode is Mode.SWAP:
            if index not in self.policy.swap_tensors:
                return tensor.detach()
            if first:
                entry = self.runtime.store.put(_bytes_view(tensor))
                # Refused (arena full): hold it, detached so the frame never reaches its grad_fn.
                self.entries[index] = entry if entry is not None else tensor.detach()
            entry = self.entries[index]
            if isinstance(entry, torch.Tensor):
                return tensor.detach()
            self.handles[index] = self.handles.get(index, 0) + 1
            return _Swapped(self, index, tensor)
        if mode is Mode.TOKEN_WISE:
            return self._pack_rows(tensor, index, first)
        # Detached: returning a saved output itself would tie it to its own grad_fn in a cycle.
        return tensor.detach()

    def _pack_rows(self, tensor: torch.Tensor, index: int, first: bool):
        policy = self.policy
        if first:
            rows = policy.rows
            dim = policy.token_dims[index] if index < len(policy.token_dims) else None
            whole = (dim is not None and tensor.is_contiguous() and tensor.storage_offset() == 0
                     and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()
                     and math.prod(tensor.shape[: dim + 1]) == rows)
            if not whole:
                # Not a plain row-major tensor over the token rows: hold it whole, stay exact.
                self.entries[index] = tensor.detach()
                return tensor.detach()
            flat = tensor.detach().reshape(rows, -1)
            keep, swap = policy.keep_rows, policy.swap_rows
            kept = flat[:keep].clone() if keep else None
            swapped = self.runtime.store.put(flat[keep: keep + swap]) if swap else None
            if swap and swapped is None:
                kept = flat[: keep + swap].clone()
            self.entries[index] = (kept, swapped, tensor.shape)
        entry = self.entries[index]
        if isinstance(entry, torch.Tensor):
            return tensor.detach()
        self.handles[index] = self.handles.get(index, 0) + 1
        return _Rows(self, index, tensor.shape)

    # -- unpack -------------------------------------------------------------------------------------
    def begin_backward(self) -> None:
        if not self.started_backward:
            self.started_backward = True
            self.runtime.on_unit_backward(self)

    def unpack_dropped(self, handle: _Dropped) -> torch.Tensor:
        self.begin_backward()
        if self.recomputed is None or handle.call not in self.recomputed:
            self.recomputed = self._recompute()
        return self.recomputed.pop(handle.call)

    def unpack_swapped(self, handle: _Swapped) -> torch.Tensor:
        self.begin_backward()
        raw = self.rows_cache.get(handle.storage)
        if raw is None:
            raw = self.runtime.store.fetch(self.entries[handle.storage])
            self.rows_cache[handle.storage] = raw
        self._release(handle.storage)
        out = torch.empty(0, dtype=handle.dtype, device=raw.device)
        return out.set_(raw.untyped_storage(), handle.offset, handle.size, handle.stride)

    def unpack_rows(self, handle: _Rows) -> torch.Tensor:
        self.begin_backward()
        full = self.rows_cache.get(handle.storage)
        if full is None:
            entry = self.entries[handle.storage]
            if entry is None:
                raise RuntimeError(
                    f"memopt: unit {self.runtime.unit_names[self.unit_index]!r} is split by token rows and its saved "
                    "tensors were used by an earlier backward; a second backward through the same graph "
                    "(retain_graph=True) needs MemoptConfig(token_separable={name: False}) for such units")
            kept, swapped, shape = entry
            policy = self.policy
            parts = []
            if kept is not None:
                parts.append(kept)
            if isinstance(swapped, HostEntry):
                parts.append(self.runtime.store.fetch(swapped))
            if self.drop_input is not None:
                if self.recomputed is None:
                    self.recomputed = self._recompute_rows()
                rebuilt = self.recomputed.pop(handle.storage)
                if parts and (rebuilt.shape[1:], rebuilt.dtype, rebuilt.device) != \
                        (parts[0].shape[1:], parts[0].dtype, parts[0].device):
                    raise RuntimeError(
                        f"memopt: the token-wise recompute of unit {self.runtime.unit_names[self.unit_index]!r} gave "
                        f"rows of saved tensor #{handle.storage} (among its distinct tensors) {_show(_describe(rebuilt))},"
                        f" the forward's rows {_show(_describe(parts[0]))}; declare the unit not token-separable: "
                        "MemoptConfig(token_separable={name: False})")
                parts.append(rebuilt)
            # The parts go as soon as the full tensor exists: the unit never holds both.
            self.entries[handle.storage] = None
            full = torch.cat(parts) if len(parts) > 1 else parts[0]
            del parts
            if full.shape[0] != policy.rows:
                raise RuntimeError(f"memopt: unit {self.runtime.unit_names[self.unit_index]!r} rebuilt "
                                   f"{full.shape[0]} token rows, expected {policy.rows}")
            full = full.view(shape)
            self.rows_cache[handle.storage] = full
        self._release(handle.storage)
        return full

    def _release(self, storage: int) -> None:
        """Drop the frame's reference once every handle of a storage was unpacked; autograd holds it now."""
        left = self.handles.get(storage, 0) - 1
        self.handles[storage] = left
        if left <= 0:
            self.rows_cache.pop(storage, None)

    def prefetch(self) -> None:
        for entry in self.entries.values():
            if isinstance(entry, HostEntry):
                self.runtime.store.prefetch(entry)
            elif isinstance(entry, tuple) and isinstance(entry[1], HostEntry):
                self.runtime.store.prefetch(entry[1])

    # -- recompute ----------------------------------------------------------------------------------
    def forward_context(self):
        """What the first forward runs under besides the pack hooks: the recorder of a selective unit."""
        if self.policy.mode is not Mode.SELECTIVE:
            return contextlib.nullcontext()
        mode = ExpensiveOutputs(self.runtime.device)
        self.recorded = mode.recorded
        return mode

    def _replay(self, args, kwargs) -> list[torch.Tensor]:
        """Run the unit's forward again as it ran the first time; return what it saved, in pack order."""
        captured: list[torch.Tensor] = []

        def capture(tensor):
            # Detached, and nothing handed back to the throwaway graph: a saved output that points at its
            # own grad_fn would form a reference cycle autograd never frees. A parameter or a view of one
            # stays itself, as pack left it (still recognisable as one: under ZeRO-3 its storage is new).
            captured.append(tensor if self.runtime.is_param(tensor) else tensor.detach())

        device = self.runtime.device
        devices = [device] if self.cuda_rng is not None else []
        versions = []
        if self.caches is not None:
            versions = self.caches.versions()
            args, kwargs = self.caches.replay_arguments(args, kwargs)
        # A recompute must not update running statistics (BatchNorm) a second time.
        module = self.runtime.units[self.unit_index][1]
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices, enabled=True, device_type=device.type):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, device)
            serve = (ExpensiveOutputs(device, self.recorded, self.runtime.unit_names[self.unit_index])
                     if self.recorded is not None
                     else contextlib.nullcontext())
            recorder = self.runtime.recorder
            timing = recorder.replay_context(self.unit_index) if recorder is not None else contextlib.nullcontext()
            with torch.enable_grad(), _autocast(device, self.autocast), \
                    torch.autograd.graph.saved_tensors_hooks(capture, _identity), serve, _keep_gathered(module), timing:
                self.forward(*args, **kwargs)
            if self.recorded is not None and serve.served != len(self.recorded):
                raise RuntimeError(
                    f"memopt: the selective replay of unit {self.runtime.unit_names[self.unit_index]!r} ran "
                    f"{serve.served} expensive ops, its forward {len(self.recorded)}; its forward must take "
                    "the same path every time (data-dependent control flow is the usual cause)")
        if buffers:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        if changed(versions):
            raise RuntimeError(
                f"memopt: recomputing unit {self.runtime.unit_names[self.unit_index]!r} updated its cache argument in "
                "place (a static cache); pass use_cache=False for training, or plan the unit without recompute: "
                "MemoptConfig(allow_recompute=False) or leave it out of MemoptConfig(units=...)")
        seconds = time.perf_counter() - start
        self.runtime.note_recompute(seconds)
        if self.runtime.recorder is not None:
            self.runtime.recorder.on_recompute(self.unit_index, captured, seconds)
        return captured

    def _recompute(self) -> dict[int, torch.Tensor]:
        detach = lambda t: t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t  # noqa: E731
        captured = self._replay(tree_map(detach, self.args), tree_map(detach, self.kwargs))
        name = self.runtime.unit_names[self.unit_index]
        if len(captured) != self.calls:
            raise RuntimeError(
                f"memopt: recomputing unit {name!r} saved {len(captured)} tensors, its forward saved {self.calls}; "
                "its forward must take the same path every time (data-dependent control flow is the usual cause). "
                "Exclude it from MemoptConfig(units=...) or plan it with allow_recompute=False"
            )
        for call, expected in self.dropped.items():
            got = _describe(captured[call])
            if got != expected:
                raise RuntimeError(
                    f"memopt: recomputing unit {name!r} gave saved tensor #{call} (in the order autograd saved them) "
                    f"{_show(got)}, its forward {_show(expected)}; the unit's forward must compute the same tensors "
                    "every time (data-dependent control flow is the usual cause). Exclude it from "
                    "MemoptConfig(units=...) or plan it with allow_recompute=False")
        return dict(enumerate(captured))

    def _recompute_rows(self) -> dict[int, torch.Tensor]:
        rows, requires_grad, shape = self.drop_input
        x = rows.view(shape).requires_grad_(requires_grad)
        captured = self._replay((x,), {})
        out: dict[int, torch.Tensor] = {}
        seen: dict[int, int] = {}
        for tensor in captured:
            key = _storage_key(tensor)
            if key in seen or self.runtime.is_param(tensor):
                continue
            seen[key] = len(seen)
            out[seen[key]] = tensor.reshape(rows.shape[0], -1) if tensor.dim() else tensor
        if len(out) != self.distinct:
            raise RuntimeError(
                f"memopt: token-wise recompute of unit {self.runtime.unit_names[self.unit_index]!r} saved "
                f"{len(out)} tensors, the forward {self.distinct}; declare it not token-separable: "
                "MemoptConfig(token_separable={name: False})"
            )
        return out


def _identity(x):
    return x


def _show(described: tuple) -> str:
    shape, dtype, device = described
    return f"of shape {list(shape)}, {str(dtype).replace('torch.', '')} on {device}"


_REPLAY = -1  # the "module" that holds gathered DeepSpeed ZeRO-3 parameters during a replay


@contextlib.contextmanager
def _keep_gathered(module: torch.nn.Module):
    """Hold the DeepSpeed ZeRO-3 parameters of ``module`` that are gathered now, through a replay.

    A replay runs the unit's forward inside backward; DeepSpeed's forward hooks then release each
    submodule's parameters after it, including those of the submodule whose backward is running and
    needs them next. Marking them in use by one more holder for the replay keeps them; DeepSpeed releases
    them as usual after their backward. Other parameters are gathered and released by the hooks as in
    any forward. A no-op without ZeRO-3 parameters."""
    held = [p for p in module.parameters()
            if isinstance(getattr(p, "ds_active_sub_modules", None), set)
            and getattr(getattr(p, "ds_status", None), "name", None) == "AVAILABLE"]
    for p in held:
        p.ds_active_sub_modules.add(_REPLAY)
    try:
        yield
    finally:
        for p in held:
            p.ds_active_sub_modules.discard(_REPLAY)


def unpack(handle):
    """The unpack hook shared by every frame."""
    if isinstance(handle, torch.Tensor):
        return handle
    if isinstance(handle, _Dropped):
        return handle.frame.unpack_dropped(handle)
    if isinstance(handle, _Swapped):
        return handle.frame.unpack_swapped(handle)
    return handle.frame.unpack_rows(handle)


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _autocast(device: torch.device, state: tuple[bool, torch.dtype]):
    kind = device.type if device.type in ("cuda", "cpu") else "cpu"
    return torch.autocast(kind, dtype=state[1], enabled=state[0])
