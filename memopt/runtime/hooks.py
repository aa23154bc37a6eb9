"""``Runtime``: installs the per-unit frames on a model's modules and removes them without a trace."""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
import weakref

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .._storages import StorageMap
from .._warn import warn
from ..blocks import call_name, split_name
from ..decisions import Mode
from .engine import Frame, UnitPolicy, unpack
from .store import HostStore
from .switches import ModelSwitches

__all__ = ["Runtime"]


class Runtime:
    """Applies one ``UnitPolicy`` per unit through ``saved_tensors_hooks`` around each unit's forward.

    Only the modules' instance ``forward`` attribute is replaced (and restored by ``remove``): no
    parameters, buffers or ``state_dict`` keys change.

    Args:
        model (nn.Module): the model.
        units (list[tuple[str, nn.Module]]): the planning units, in forward order.
        policies (list[UnitPolicy]): one per unit.
        host_capacity_bytes (int): size of the host arena for swapped tensors.
        lookahead (int, default 1): units whose swapped tensors are prefetched ahead in backward.
        on_shape_change (str, default "recompute"): see ``MemoptConfig.on_shape_change``.
        recorder (object | None): profiling callbacks (``before_forward``, ``forward_context``,
            ``after_forward``, ``on_backward``, ``replay_context``, ``on_recompute``); None when training.
        announce (bool, default False): warn once about the model switches ``install`` turns (the KV cache
            off for training forwards, Hugging Face gradient checkpointing off); see ``ModelSwitches``.
    """

    def __init__(self, model: nn.Module, units: list[tuple[str, nn.Module]], policies: list[UnitPolicy], *,
                 host_capacity_bytes: int = 0, lookahead: int = 1, on_shape_change: str = "recompute",
                 recorder=None, announce: bool = False) -> None:
        if len(units) != len(policies):
            raise ValueError(f"{len(units)} units but {len(policies)} policies")
        self.model = model
        self.units = list(units)
        self.unit_names = [name for name, _ in units]
        self.policies = list(policies)
        self.lookahead = lookahead
        self.on_shape_change = on_shape_change
        self.recorder = recorder
        self.device = _model_device(model)
        needs_store = any(p.mode is Mode.SWAP or (p.mode is Mode.TOKEN_WISE and p.swap_rows) for p in policies)
        self.store = HostStore(self.device, host_capacity_bytes) if needs_store else None
        self.param_storages = StorageMap()
        self.frames: dict[int, weakref.ref] = {}
        self.recompute_count = 0
        self.recompute_s = 0.0
        self.forward_calls = 0
        self.shape_fallbacks = 0
        self._warned_shape = False
        self.call_fallbacks = 0
        self._warned_calls = False
        # A module called several times per step is several units, one per call in call order (a
        # weight-shared layer): its calls in the current step pick them in turn. While profiling (``grow``),
        # a call beyond a module's units becomes a new unit.
        self.grow = False
        self._slots: dict[int, list[int]] = {}
        self._calls: dict[int, int] = {}
        self._saved_forward: dict[int, object] = {}
        self._root_hook = None
        self._root_output_hook = None
        self._switches: ModelSwitches | None = None
        self._announce = announce

    # -- install / remove ---------------------------------------------------------------------------
    def install(self) -> None:
        self._switches = ModelSwitches(self.model, announce=self._announce)
        for index, (_, module) in enumerate(self.units):
            self._slots.setdefault(id(module), []).append(index)
        for key, indices in self._slots.items():
            module = self.units[indices[0]][1]
            self._saved_forward[key] = module.__dict__.get("forward", _MISSING)
            module.forward = functools.partial(self._call, key, module.forward)
        self._root_hook = self.model.register_forward_pre_hook(lambda *_: self.new_step())
        # The loss's gradient starts backward: the last units' copies back begin under the head's backward.
        self._root_output_hook = self.model.register_forward_hook(self._on_model_output)
        self.refresh_params()

    def new_step(self) -> None:
        """A forward of the whole model begins: count each module's calls from the first again."""
        self._calls.clear()
        self.refresh_params()

    def remove(self) -> None:
        for key, indices in self._slots.items():
            module = self.units[indices[0]][1]
            saved = self._saved_forward.pop(key, _MISSING)
            if saved is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        if self._root_hook is not None:
            self._root_hook.remove()
            self._root_hook = None
        if self._root_output_hook is not None:
            self._root_output_hook.remove()
            self._root_output_hook = None
        if self._switches is not None:
            self._switches.restore()
            self._switches = None
        self._slots.clear()
        self._calls.clear()
        self.frames.clear()

    def refresh_params(self) -> None:
        """Remember which storages are parameters or buffers: those are never swapped or dropped. Weakly:
        a parameter's data can change hands (DeepSpeed ZeRO-3 swaps it for a gathered copy and back; FSDP2 lists
        sharded parameters while the forward computes with unsharded ones, counted too), and the address of a
        storage that died must not pass for a parameter's when a new one takes it."""
        storages = StorageMap()
        for t in (*self.model.parameters(), *self.model.buffers(), *_fsdp_unsharded(self.model)):
            storages.add(t.untyped_storage(), None)
        self.param_storages = storages

    def is_param(self, tensor: torch.Tensor) -> bool:
        """Whether a saved tensor is a parameter or buffer (or a view of one), which stays as it is. A view
        is told by its base too: under ZeRO-3 a gathered weight's storage is new at every forward."""
        return (isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
                or tensor.untyped_storage() in self.param_storages)

    # -- the wrapped forward ------------------------------------------------------------------------
    def _call(self, key: int, forward, *args, **kwargs):
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return forward(*args, **kwargs)
        index, fallback = self._unit_of_call(key)
        policy = fallback or self._policy_for(index, args, kwargs)
        recorder = self.recorder
        if policy.mode is Mode.KEEP and recorder is None:
            out = forward(*args, **kwargs)
            self._end_unit()
            return self._watch_backward(index, out)
        self.forward_calls += 1
        frame = Frame(self, index, policy, forward, args, kwargs)
        self.frames[index] = weakref.ref(frame)
        if recorder is not None:
            recorder.before_forward(index, args, kwargs)
        measure = recorder.forward_context(index) if recorder is not None else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(frame.pack, unpack), frame.forward_context(), measure:
            out = forward(*args, **kwargs)
        if recorder is not None:
            recorder.after_forward(index, args, kwargs, out, forward)
        self._end_unit()
        return self._watch_backward(index, out)

    def _end_unit(self) -> None:
        if self.store is not None and self.store.asynchronous:
            self.store.end_unit()  # the unit before's copies out are done before what comes next reuses them

    def _watch_backward(self, index: int, out):
        """Have the gradient of ``out`` (unit ``index``'s output; ``len(units)`` for the model's) start the copies
        back of the units whose backward comes next. It arrives as that backward begins, whether or not the unit
        unpacks anything (a kept one never does), so the copies overlap it as the simulator has them."""
        if self.store is not None and self.store.asynchronous:
            loss = getattr(out, "loss", None)  # a model output that is no pytree node (older transformers)
            leaves = {id(leaf): leaf for leaf in (*tree_leaves(out), loss) if isinstance(leaf, torch.Tensor)}
            for leaf in leaves.values():
                if leaf.requires_grad:
                    leaf.register_hook(functools.partial(self._backward_reached, index))
        return out

    def _on_model_output(self, _module, _args, out) -> None:
        if self.store is not None and self.store.asynchronous:
            self.store.end_forward()
        self._watch_backward(len(self.units), out)

    def _backward_reached(self, index: int, grad) -> None:
        # H2D of unit u starts when the backward of u + lookahead starts (simulator); the gradient stays as it is.
        self._prefetch_units(index, index - self.lookahead)

    def _prefetch_units(self, top: int, bottom: int) -> None:
        """Start the copies back of units ``top`` down to ``bottom`` (a no-op for those started or fetched)."""
        if self.store is None:
            return
        for unit in range(top, max(bottom, 0) - 1, -1):
            ref = self.frames.get(unit)
            frame = ref() if ref is not None else None
            if frame is not None:
                frame.prefetch()

    def _unit_of_call(self, key: int) -> tuple[int, UnitPolicy | None]:
        """The unit of this call of a module, and the policy replacing its own when the call was not planned."""
        slots = self._slots[key]
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        if call < len(slots):
            return slots[call], None
        if self.grow:
            return self._add_unit(key, call), None
        if len(slots) == 1:
            return slots[0], None  # a module planned as one unit keeps its policy for every call
        self.call_fallbacks += 1
        if not self._warned_calls:
            self._warned_calls = True
            path = split_name(self.unit_names[slots[0]])[0]
            warn(f"memopt: {path!r} was called {call + 1} times in one step but planned for {len(slots)} calls; the "
                 "calls beyond are recomputed whole (exact, may cost time). handle.replan(sample) plans them")
        return slots[-1], UnitPolicy(Mode.RECOMPUTE)

    def _add_unit(self, key: int, call: int) -> int:
        slots = self._slots[key]
        path = split_name(self.unit_names[slots[0]])[0]
        index = len(self.units)
        self.units.append((call_name(path, call), self.units[slots[0]][1]))
        self.unit_names.append(self.units[-1][0])
        self.policies.append(self.policies[slots[0]])
        slots.append(index)
        if self.recorder is not None:
            self.recorder.add_unit(self.units[-1][0])
        return index

    def _policy_for(self, index: int, args, kwargs) -> UnitPolicy:
        policy = self.policies[index]
        if policy.mode is not Mode.TOKEN_WISE:
            return policy
        x = args[0] if args else None
        if (isinstance(x, torch.Tensor) and len(args) == 1 and not kwargs and x.dim() >= 2
                and x.numel() // max(x.shape[-1], 1) == policy.rows):
            return policy
        if self.on_shape_change == "error":
            raise ValueError(
                f"memopt: unit {self.unit_names[index]!r} was planned for {policy.rows} token rows and got an "
                "input of another shape; call handle.replan(sample) with a batch of the new shape, or set "
                "MemoptConfig(on_shape_change='recompute') to recompute such units"
            )
        self.shape_fallbacks += 1
        if not self._warned_shape:
            self._warned_shape = True
            warnings.warn(
                f"memopt: a batch of another shape than the profiled one reached unit {self.unit_names[index]!r}; "
                "its token-wise plan is replaced by full recompute (exact, slower). handle.replan(sample) "
                "plans for the new shape", stacklevel=3)
        return UnitPolicy(Mode.RECOMPUTE)

    # -- callbacks from frames ----------------------------------------------------------------------
    def on_unit_backward(self, frame: Frame) -> None:
        if self.store is not None:
            if self.store.asynchronous:
                self.store.end_forward()  # a model whose forward the root hook did not see end (no-op otherwise)
            # The unit's own swapped tensors come back together as its backward starts (a no-op when its
            # output's gradient hook already started them); later units' copies start now only where they
            # overlap (asynchronous copies).
            frame.prefetch()
            if self.store.asynchronous:
                self._prefetch_units(frame.unit_index - 1, frame.unit_index - self.lookahead)
        if self.recorder is not None:
            self.recorder.on_backward(frame.unit_index)

    def note_recompute(self, seconds: float) -> None:
        self.recompute_count += 1
        self.recompute_s += seconds

    def stats(self) -> dict:
        out = {"unit_forward_calls": self.forward_calls, "recomputes": self.recompute_count,
               "recompute_s": self.recompute_s, "shape_fallbacks": self.shape_fallbacks,
               "call_fallbacks": self.call_fallbacks}
        if self.store is not None:
            out.update(self.store.stats())
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


_MISSING = object()


def _fsdp_unsharded(model: nn.Module) -> list[torch.Tensor]:
    """FSDP2's unsharded parameters in ``model``: what its forward computes with (and autograd saves views of)
    while the model lists the sharded ones. FSDP frees and refills their storage in place, so it is theirs from
    the first unshard on. None without FSDP2."""
    kind = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)  # not imported: no FSDP2 model
    if kind is None:
        return []
    found = []
    for module in model.modules():
        if isinstance(module, kind):
            for group in getattr(module._get_fsdp_state(), "_fsdp_param_groups", ()):
                found.extend(fp._unsharded_param for fp in group.fsdp_params if hasattr(fp, "_unsharded_param"))
    return found


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
