"""Live profiler: one training step in safe mode, measured into a ``TrainingGraph``.

Safe mode recomputes every unit, so profiling needs no more memory than the leanest plan. Each unit's
saved tensors are observed while it is recomputed in backward; parameters and buffers never count and
tensors sharing a storage count once. Memory comes from ``MemoryMeter``, plus what the step leaves
allocated on CUDA outside any tensor (cuBLAS and attention workspaces), counted as fixed bytes. Times come
from ``perf_counter`` (with CUDA synchronisation on GPU), and on CUDA from events around each recompute and
each expensive op, whose kernels the CPU clock would see only launched. The step leaves no trace:
gradients, buffers, RNG states and the model's modes are as they were.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._storages import StorageMap
from ._warn import warn
from .blocks import call_name, select_units, split_name
from .config import MemoptConfig
from .errors import MemoptError
from .graph import Mode, TrainingGraph, Unit
from .hardware import Hardware
from .head_profile import HeadCapture, profile_head
from .meter import DeviceProbe, MemoryMeter
from .model_states import live_model_states
from .runtime.caches import copy_caches
from .runtime.engine import UnitPolicy, row_input_shape
from .runtime.head import HeadChunking, find_head
from .runtime.hooks import Runtime
from .runtime.selective import is_expensive

__all__ = ["compute_loss", "profile_model", "run_model"]


def run_model(model: nn.Module, sample):
    """Call the model on one batch: a tensor, a tuple/list of positional inputs, or a dict of keywords."""
    if isinstance(sample, dict):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)


def compute_loss(output, sample, config: MemoptConfig) -> torch.Tensor:
    """``output.loss`` when present, else ``config.loss_fn(output, sample)``, else a scalar output."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None and config.loss_fn is not None:
        try:
            loss = config.loss_fn(output, sample)
        except (torch.OutOfMemoryError, MemoptError):
            raise  # not the loss_fn's mistake: as it was
        except Exception as exc:
            raise ValueError(
                f"memopt: MemoptConfig.loss_fn raised {type(exc).__name__}: {exc} on a sample of shapes "
                f"{_describe(sample)} (output {_describe(output)}); it must compute the loss of the sample it is "
                "given: targets it closes over must match this batch (handle.replan(batch) profiles that batch "
                "with the same loss_fn)") from exc
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"memopt: MemoptConfig.loss_fn returned {shape}; it must return a scalar tensor "
                             "(reduce it, e.g. with .mean() or .sum())")
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        hint = ""
        if isinstance(sample, dict) and "labels" not in sample and hasattr(output, "logits"):
            # A Hugging Face model computes its loss when the batch has labels (a misspelt key is passed on and
            # ignored by its **kwargs).
            hint = (f" A Hugging Face model computes its loss when the batch has 'labels' (its keys: "
                    f"{sorted(sample)}); for a causal LM e.g. {{'input_ids': ids, 'labels': ids}}. Or")
        raise ValueError(
            f"memopt needs a scalar loss: the model returned {type(output).__name__} without a .loss"
            f"{'.' + hint if hint else ';'} pass "
            "MemoptConfig(loss_fn=lambda output, sample: ...) returning a scalar tensor"
        )
    return loss


@dataclass
class _UnitRecord:
    forward_s: list[float] = field(default_factory=list)
    recompute_s: float = 0.0
    backward_s: float = 0.0
    input_bytes: int = 0
    outside_input_bytes: int = 0  # inputs the step did not allocate (the batch)
    output_bytes: int = 0
    forward_peak_live: int = 0
    recompute_peak_live: int = 0
    backward_peak_live: int = 0
    tensor_bytes: list[int] = field(default_factory=list)
    outside: list[bool] = field(default_factory=list)  # saved storages the step did not allocate
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    probe: tuple[bool, int, int, list[tuple[int, ...]]] | None = None
    declared: bool | None = None
    backward_start_s: float = 0.0
    expensive_bytes: int = 0
    expensive_s: float = 0.0
    # On CUDA, the device seconds of the unit's replay and of the expensive ops within it: both warm (the
    # forward ran the kernels first) and read from events, where the forward's own are cold (first launches).
    replay_s: float | None = None
    replay_expensive_s: float = 0.0
    order: int | None = None  # place of the unit's first call among the step's unit calls


class _ExpensiveOps(TorchDispatchMode):
    """Bytes and seconds of a unit's expensive ops (what a selective recompute keeps and skips)."""

    def __init__(self, record: _UnitRecord, clock, sync, device_events: bool = False, replay: bool = False) -> None:
        super().__init__()
        self.record, self.clock, self.sync = record, clock, sync
        self.replay = replay  # times go to ``replay_expensive_s``, bytes are the forward's
        self.seen = StorageMap()
        # On CUDA each op is timed by events around it, read when the unit's forward ends: a synchronisation
        # per op would time launches and stall the queue the op's neighbours run in.
        self.events: list[tuple] | None = [] if device_events else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not is_expensive(func):
            return func(*args, **(kwargs or {}))
        if self.events is not None:
            start = _timing_event()
            out = func(*args, **(kwargs or {}))
            self.events.append((start, _timing_event()))
            if self.replay:
                return out
        else:
            self.sync()
            start = self.clock()
            out = func(*args, **(kwargs or {}))
            self.sync()
            self.record.expensive_s += self.clock() - start
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = leaf.untyped_storage()
            if storage not in self.seen:
                self.seen.add(storage, True)
                self.record.expensive_bytes += storage.nbytes()
        return out

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self.events:
            seconds = sum(_elapsed_s(start, end) for start, end in self.events)
            if self.replay:
                self.record.replay_expensive_s += seconds
            else:
                self.record.expensive_s += seconds
            self.events.clear()
        return out


def _timing_event():
    """A CUDA event with timing, recorded now on the current stream. (CPU tests fake it; on a GPU
    tests/test_profiler_cuda.py::test_profiled_times_are_device_times_on_cuda checks the times it gives.)"""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_s(start, end) -> float:
    """Device seconds between two recorded events (waits for ``end``: profiling only, never in training)."""
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class _Recorder:
    """Callbacks from the runtime during the profiled step; raw live-byte peaks per phase."""

    def __init__(self, meter: MemoryMeter, names: list[str], config: MemoptConfig, device: torch.device,
                 clock: Callable[[], float] | None = None) -> None:
        self.meter, self.names, self.config, self.device = meter, names, config, device
        self.timing_only = False
        self.clock = clock or time.perf_counter
        # A modelled clock (fake profile) advances only with the ops it costs, so the runtime's wall-clock
        # recompute seconds are replaced by the clock's reading since the unit's backward began.
        self.modelled_clock = clock is not None
        # On CUDA a replay only launches its kernels before the CPU clock is read; its device time comes from
        # events (``on_recompute``), as do the expensive ops' (``_ExpensiveOps``).
        self.device_events = device.type == "cuda" and clock is None
        self.backward_event = None
        self.records = [_UnitRecord() for _ in names]
        self.calls = 0  # unit forwards so far: a record's ``order`` is its first call's place among them
        self.input_owner: dict[int, tuple[int, int, bool]] = {}  # input storage -> (first unit, bytes, made by the step)
        self.shared_inputs: set[int] = set()
        self.shared_saved = False  # a unit saves a shared input: it is held until that unit's backward
        self.shared_input_bytes = 0
        self.runtime: Runtime | None = None
        self.forward_t0 = 0.0
        self.fixed_bytes = 0
        self.fixed_at_last_forward = 0
        self.head_peak_live = 0
        self.current_backward: int | None = None
        self.first_backward_s: float | None = None
        for index, name in enumerate(names):
            self.records[index].declared = self._declared(name)

    def _declared(self, name: str) -> bool | None:
        path = split_name(name)[0]
        for pattern, value in self.config.token_separable.items():
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(path, pattern):
                return bool(value)
        return None

    def add_unit(self, name: str) -> None:
        """A further call of a unit's module in the step: a unit of its own (the runtime named it)."""
        self.names.append(name)
        self.records.append(_UnitRecord(declared=self._declared(name)))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_forward(self, index, args, kwargs) -> None:
        rec = self.records[index]
        if rec.order is None:
            rec.order = self.calls
        self.calls += 1
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                key = leaf.untyped_storage()._cdata
                first = self.input_owner.get(key)
                if first is not None:
                    if first[0] != index and first[2] and key not in self.shared_inputs:
                        # Made by the step and passed to a second unit (a mask, rotary tables): not one
                        # unit's input but shared, held while any recompute may need it.
                        self.shared_inputs.add(key)
                        self.records[first[0]].input_bytes -= first[1]
                        self.shared_input_bytes += first[1]
                    continue
                if self.runtime.is_param(leaf):
                    continue
                nbytes, tracked = leaf.untyped_storage().nbytes(), self.meter.tracks(leaf)
                self.input_owner[key] = (index, nbytes, tracked)
                if tracked:
                    rec.input_bytes += nbytes
                else:
                    rec.outside_input_bytes += nbytes
        self.sync()
        self.meter.reset_window()
        self.forward_t0 = self.clock()

    def forward_context(self, index: int):
        if self.timing_only:
            return contextlib.nullcontext()
        rec = self.records[index]
        rec.expensive_bytes, rec.expensive_s = 0, 0.0
        return _ExpensiveOps(rec, self.clock, self.sync, self.device_events)

    def replay_context(self, index: int):
        """Around a unit's replay in backward: on CUDA its expensive ops are timed by events (warm, unlike the
        forward's), so a selective recompute's seconds are the replay's less theirs."""
        if self.timing_only or not self.device_events:
            return contextlib.nullcontext()
        rec = self.records[index]
        rec.replay_expensive_s = 0.0
        return _ExpensiveOps(rec, self.clock, self.sync, device_events=True, replay=True)

    def after_forward(self, index, args, kwargs, out, forward) -> None:
        self.sync()
        rec = self.records[index]
        rec.forward_s.append(self.clock() - self.forward_t0)
        rec.forward_peak_live = self.meter.window_peak()
        seen = set()
        rec.output_bytes = 0
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage()._cdata not in seen:
                seen.add(leaf.untyped_storage()._cdata)
                rec.output_bytes += leaf.untyped_storage().nbytes()
        if not self.timing_only and rec.declared is not False and (self.config.probe_separable or rec.declared):
            rec.probe = self._probe(args, kwargs, out, forward)
        self.fixed_at_last_forward = self.fixed_bytes
        self.meter.reset_window()

    def _probe(self, args, kwargs, out, forward):
        """Run the unit on its last rows; returns (outputs equal, probe rows, full rows, saved shapes)."""
        x = args[0] if len(args) == 1 else None
        if (not isinstance(x, torch.Tensor) or x.dim() < 2 or not isinstance(out, torch.Tensor)
                or any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(kwargs))):
            return None
        if isinstance(out, FakeTensor):  # a trace without data cannot compare rows: not known separable
            return None
        rows = x.numel() // max(x.shape[-1], 1)
        step = self.config.row_multiple
        n = (rows // 2) // step * step if rows >= 2 * step else rows // 2
        if n < 1 or out.numel() % rows:
            return None
        xs = x.detach().reshape(rows, -1)[rows - n:].reshape(row_input_shape(x, n)).requires_grad_(x.requires_grad)
        captured: list[torch.Tensor] = []

        def capture(tensor):
            captured.append(tensor.detach())

        devices = [self.device] if self.device.type == "cuda" else []
        self.meter.paused = True
        try:
            with torch.random.fork_rng(devices=devices, device_type=self.device.type), torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(capture, _identity):
                try:
                    ys = forward(xs)
                except Exception:  # noqa: BLE001 - a unit that cannot run on a row slice is not separable
                    return None
            equal = (isinstance(ys, torch.Tensor) and ys.numel() * rows == out.numel() * n
                     and torch.equal(ys.detach().reshape(n, -1), out.detach().reshape(rows, -1)[rows - n:]))
            shapes = _distinct_shapes(captured, self.runtime.is_param)
        finally:
            self.meter.paused = False
            captured.clear()
        return equal, n, rows, shapes

    def on_backward(self, index: int) -> None:
        self.sync()
        now = self.clock()
        if self.current_backward is None:
            self.head_peak_live = self.meter.window_peak()
            self.first_backward_s = now
        else:
            self.close_backward(now)
        self.current_backward = index
        self.records[index].backward_start_s = now
        self.backward_event = _timing_event() if self.device_events else None
        self.meter.reset_window()

    def on_recompute(self, index: int, captured: list[torch.Tensor], seconds: float) -> None:
        rec = self.records[index]
        if self.modelled_clock:
            seconds = self.clock() - rec.backward_start_s
        elif self.backward_event is not None:
            # The replay runs first in the unit's backward: the device time since that began is the replay's.
            seconds = _elapsed_s(self.backward_event, _timing_event())
            if not self.timing_only:
                rec.replay_s = seconds
        rec.recompute_s += seconds
        rec.forward_s.append(seconds)
        rec.recompute_peak_live = self.meter.window_peak()
        # The rest of the unit's backward is measured on its own: a unit that is not recomputed never holds
        # the replay's transients (its outputs among them).
        self.meter.reset_window()
        seen: set[int] = set()
        rec.tensor_bytes, rec.shapes, rec.outside = [], [], []
        for tensor in captured:
            key = tensor.untyped_storage()._cdata
            if key in seen or self.runtime.is_param(tensor):
                continue
            seen.add(key)
            # A tensor off the device (flash attention's CPU seed and offset) takes no device memory, and the
            # runtime keeps it where it is.
            rec.tensor_bytes.append(tensor.untyped_storage().nbytes() if tensor.device == self.device else 0)
            # A tensor passed to several units (rotary tables, a mask) is held once, as a shared input: in a
            # unit's saved set it frees or costs nothing, like one the step did not allocate.
            shared = key in self.shared_inputs
            self.shared_saved = self.shared_saved or shared
            rec.outside.append(shared or not self.meter.tracks(tensor))
            rec.shapes.append(tuple(tensor.shape))

    def close_backward(self, now: float) -> None:
        index = self.current_backward
        if index is None:
            return
        rec = self.records[index]
        rec.backward_s = max(0.0, now - rec.backward_start_s - rec.recompute_s)
        rec.backward_peak_live = self.meter.window_peak()
        self.current_backward = None

    def workspaces(self) -> tuple[int, int, list[tuple[int, int, int]]]:
        """Fixed bytes, head workspace and per-unit (forward, backward, checkpoint) workspaces.

        Each is measured relative to what the simulator holds at that phase under the profiled plan
        (every unit recomputed: it holds its inputs), so the simulator reproduces the profiled peaks.
        """
        fixed = self.fixed_at_last_forward
        out = []
        prior = fixed + self.shared_input_bytes  # every unit recomputed in safe mode: they hold the shared inputs
        for rec in self.records:
            saved = sum(b for b, outside in zip(rec.tensor_bytes, rec.outside) if not outside)
            out.append((max(0, rec.recompute_peak_live - prior - saved),
                        max(0, rec.backward_peak_live - prior - saved),
                        max(0, rec.forward_peak_live - prior)))
            prior += rec.input_bytes
        return fixed, max(0, self.head_peak_live - prior), out


def _step_bytes(rec: _UnitRecord, separable: bool) -> list[int]:
    """Saved bytes a decision can free or must copy. A storage the step did not allocate (the batch)
    frees nothing when dropped, so it counts 0 bytes but keeps its place in pack order, which the runtime
    counts the same way; a token-wise split copies its rows like any other's, so there it counts whole."""
    return [b if separable or not outside else 0 for b, outside in zip(rec.tensor_bytes, rec.outside)]


def _identity(x):
    return x


def _distinct_shapes(tensors: list[torch.Tensor], is_param) -> list[tuple[int, ...]]:
    seen: set[int] = set()
    shapes = []
    for tensor in tensors:
        key = tensor.untyped_storage()._cdata
        if key not in seen and not is_param(tensor):
            seen.add(key)
            shapes.append(tuple(tensor.shape))
    return shapes


def _token_dims(full: list[tuple[int, ...]], probe, rows: int) -> list[int | None] | None:
    """Per saved tensor, the dim whose leading product is the token rows; None when not separable."""
    equal_or_declared, n, probe_rows, shapes = probe
    if rows != probe_rows or len(shapes) != len(full):
        return None
    dims: list[int | None] = []
    for shape_full, shape_probe in zip(full, shapes):
        found = None
        for d in range(len(shape_full)):
            if (math.prod(shape_full[: d + 1]) == rows and d < len(shape_probe)
                    and math.prod(shape_probe[: d + 1]) == n and shape_full[d + 1:] == shape_probe[d + 1:]):
                found = d
                break
        if found is None:
            return None
        dims.append(found)
    return dims


def profile_model(model: nn.Module, sample, config: MemoptConfig | None = None,
                  hardware: Hardware | None = None, clock: Callable[[], float] | None = None, *,
                  timing_only: bool = False, optimizer=None) -> TrainingGraph:
    """Profile one training step of ``model`` on ``sample`` in safe mode.

    Args:
        model (nn.Module): the model, in the mode (train/eval) it will train in.
        sample: one batch: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        config (MemoptConfig | None): options; defaults when None.
        hardware (Hardware | None): figures for the planner; measured on the model's device when None.
        clock (Callable[[], float] | None): seconds source for every time measured; None is
            ``time.perf_counter``. The fake profile passes a roofline model's clock.
        timing_only (bool, default False): time the step without the memory meter, the expensive-op
            recorder and the separability probe, whose Python work per op would inflate every time; the
            graph's bytes are then meaningless (``memopt.timing.robust_times`` takes them from a full
            profile).
        optimizer (torch.optim.Optimizer | None, default None): the optimizer that trains the model: its
            states are read from it (``memopt.model_states``); None counts ``config.optimizer``'s.

    Returns:
        TrainingGraph: the measured step.
    """
    config = config or MemoptConfig()
    if getattr(model, "_memopt_handle", None) is not None:
        raise RuntimeError("memopt: this model is already optimized; call handle.remove() before profiling it again")
    sample = copy_caches(sample)  # a forward appends to a cache it is given: the caller's stays as it was
    _check_model(model, warn_eval=not timing_only)
    units = select_units(model, config.units, calls=lambda: _count_calls(model, sample))
    names = [name for name, _ in units]
    runtime = Runtime(model, units, [UnitPolicy(Mode.RECOMPUTE)] * len(units))
    runtime.grow = True
    device = runtime.device
    if hardware is None:
        hardware = Hardware.measure(str(device))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {p: p.grad for p in params}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" and torch.cuda.is_initialized() else None
    allocated_before = _device_allocated_bytes(device, clear_workspaces=not timing_only)
    for p in params:
        p.grad = torch.zeros_like(p)
    fixed_seen = StorageMap()
    # On CUDA the allocator's counters show what kernels allocate inside an op (scratch), which no op returns.
    meter = MemoryMeter(_device_probe(device))
    recorder = _Recorder(meter, names, config, device, clock)
    recorder.timing_only = timing_only

    def pack_outside(tensor):
        storage = tensor.untyped_storage()
        if storage not in fixed_seen and meter.tracks(tensor):
            fixed_seen.add(storage, True)
            recorder.fixed_bytes += storage.nbytes()
        return tensor.detach()

    recorder.runtime = runtime
    runtime.recorder = recorder
    capture, chunking, head_note = _arm_head(model, config, meter, timing_only)
    calls_of: dict[int, list[int]] = {}  # module id -> unit calls begun at each of its calls

    def note_call(module, _args):
        calls_of.setdefault(id(module), []).append(recorder.calls)

    watch = torch.nn.modules.module.register_module_forward_pre_hook(note_call)
    runtime.install()
    if chunking is not None:
        chunking.install()
    try:
        with meter if not timing_only else contextlib.nullcontext(), \
                torch.autograd.graph.saved_tensors_hooks(pack_outside, lambda t: t):
            recorder.sync()
            t0 = recorder.clock()
            output = _first_call(model, sample)
            loss = compute_loss(output, sample, config)
            if not loss.requires_grad:
                raise ValueError(
                    "memopt: the loss does not require grad, so a training step has no backward to plan: "
                    f"{'no parameter of the model requires grad' if not params else 'it does not depend on the trainable parameters'}; "
                    "unfreeze what should train (requires_grad_(True)) before memopt.optimize")
            recorder.sync()
            t_forward_end = recorder.clock()
            del output
            loss.backward()
            recorder.sync()
            t_end = recorder.clock()
            recorder.close_backward(t_end)
            del loss
    finally:
        watch.remove()
        units = list(runtime.units)
        if chunking is not None:
            chunking.remove()
        runtime.remove()
        runtime.close()
        for p in params:
            p.grad = grads[p]
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
    # What the step left allocated on the device outside any tensor the meter saw (cuBLAS keeps a workspace
    # per handle and stream: one for the forward's thread, one for autograd's; attention kernels keep theirs)
    # stays allocated through every step: it counts as fixed bytes. 0 on CPU.
    allocated_after = _device_allocated_bytes(device)
    device_workspace = max(0, allocated_after - allocated_before) if allocated_before is not None else 0
    head = None
    if capture is not None and capture.call is not None:
        head = profile_head(capture, config.row_multiple, recorder.clock, recorder.sync)
    elif chunking is not None:
        head_note = (chunking.notes[0] if chunking.notes else
                     "the step's loss never took the logits through F.cross_entropy")
    del capture

    units = _in_call_order(recorder, units)
    names = [name for name, _ in units]
    fixed, head_workspace, workspaces = recorder.workspaces()
    graph_units = []
    grads_counted: set[int] = set()
    for name, (_, module), rec, (fwd_ws, bwd_ws, ckpt_ws) in zip(names, units, recorder.records, workspaces):
        rows = rec.probe[2] if rec.probe else 0
        dims = _token_dims(rec.shapes, rec.probe, rows) if rec.probe else None
        separable = dims is not None and (rec.declared is True or (rec.declared is None and rec.probe[0]))
        # A shared module's gradients exist once: counted with its first call.
        grad_bytes = 0 if id(module) in grads_counted else sum(
            p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        grads_counted.add(id(module))
        graph_units.append(Unit(
            name=name,
            forward_s=min(rec.forward_s) if rec.forward_s else 0.0,
            backward_s=rec.backward_s,
            input_bytes=rec.input_bytes + (rec.outside_input_bytes if separable else 0),
            output_bytes=rec.output_bytes,
            tensor_bytes=_step_bytes(rec, separable),
            outside_bytes=[b if outside else 0 for b, outside in zip(rec.tensor_bytes, rec.outside)] if separable else [],
            outside_input_bytes=rec.outside_input_bytes if separable else 0,
            token_dims=dims if separable else [None] * len(rec.tensor_bytes),
            tokens=rows if separable else 0,
            token_separable=separable,
            forward_workspace_bytes=fwd_ws,
            backward_workspace_bytes=bwd_ws,
            checkpoint_workspace_bytes=ckpt_ws,
            param_grad_bytes=grad_bytes,
            selective_bytes=rec.expensive_bytes,
            selective_s=_selective_s(rec),
        ))
    unit_modules = [module for _, module in units]
    inside = {id(m) for unit in unit_modules for m in unit.modules()}
    # The parameters used only after every unit began (final norm, an untied LM head): their gradients come
    # first in backward. A parameter used before the units too (a tied embedding) gets its gradient only when
    # backward reaches that first use; until then the head's part waits in autograd's buffer, which the
    # profiled windows already saw.
    after = {id(p) for m in model.modules() if id(m) not in inside and calls_of.get(id(m))
             and min(calls_of[id(m)]) == recorder.calls for p in m.parameters(recurse=False)}
    before = {id(p) for m in model.modules() if id(m) not in inside and calls_of.get(id(m))
              and min(calls_of[id(m)]) < recorder.calls for p in m.parameters(recurse=False)}
    head_side = after - before
    states = live_model_states(model, config, optimizer, unit_modules, head_side)
    unit_forward = sum(r.forward_s[0] for r in recorder.records if r.forward_s)
    unit_backward = sum(u.backward_s + r.recompute_s for u, r in zip(graph_units, recorder.records))
    first_backward = recorder.first_backward_s or t_forward_end
    return TrainingGraph(
        units=graph_units,
        hardware=hardware,
        param_bytes=states.param_bytes,
        grad_bytes=states.grad_bytes,
        optimizer_bytes=states.optimizer_bytes,
        grads_resident=config.grad_accumulation,
        head_grad_bytes=states.head_grad_bytes,
        other_grad_bytes=states.other_grad_bytes,
        optimizer_step_bytes=states.optimizer_step_bytes,
        optimizer_step_s=states.optimizer_traffic_bytes / hardware.mem_bytes_per_s,
        fixed_activation_bytes=fixed + device_workspace,
        head_workspace_bytes=head_workspace,
        shared_input_bytes=recorder.shared_input_bytes,
        shared_saved=recorder.shared_saved,
        head=head,
        other_forward_s=max(0.0, (t_forward_end - t0) - unit_forward),
        other_backward_s=max(0.0, (t_end - t_forward_end) - unit_backward),
        meta={"model": type(model).__name__, "profiled": "live", "device": str(device),
              "sample": _describe(sample), "peak_activation_bytes_safe_mode": meter.peak_bytes,
              "first_backward_s": first_backward - t0, "device_workspace_bytes": device_workspace,
              "device_allocated_before_after": [allocated_before, allocated_after],
              "model_states_convention": states.convention,
              **({"head_note": f"the LM head is not chunked: {head_note}"} if head_note else {})},
    )


def _arm_head(model: nn.Module, config: MemoptConfig, meter: MemoryMeter, timing_only: bool):
    """The head capture and its arming for a full profiled step: (capture, chunking, note why not)."""
    if timing_only or config.head == "off":
        return None, None, ""
    head, reason = find_head(model)
    if head is None:
        return None, None, reason
    capture = HeadCapture(meter)
    return capture, HeadChunking(model, chunk_rows=1 << 62, on_loss=capture), ""


def _selective_s(rec: _UnitRecord) -> float:
    """Seconds of a unit's cheap ops, which a selective recompute reruns: its fastest forward less its expensive
    ops' seconds; on CUDA, its replay's device seconds less those of the expensive ops in it (warm, both)."""
    if not rec.forward_s or not rec.expensive_bytes:
        return 0.0
    if rec.replay_s is not None:
        return max(0.0, rec.replay_s - rec.replay_expensive_s)
    return max(0.0, min(rec.forward_s) - rec.expensive_s)


def _device_probe(device: torch.device) -> DeviceProbe | None:
    return DeviceProbe(device) if device.type == "cuda" else None


def _device_allocated_bytes(device: torch.device, clear_workspaces: bool = False) -> int | None:
    """Bytes the CUDA caching allocator has handed out on ``device``; None elsewhere. With ``clear_workspaces``
    cuBLAS's cached workspaces are released first, so a step that follows allocates (and shows) them again
    even when an earlier matmul (``Hardware.measure``, a step before memopt) made them. (CPU tests mock the
    counts; tests/test_profiler_cuda.py and test_runtime_cuda.py::test_cuda_peak_within_budget check them on a GPU.)"""
    if device.type != "cuda":
        return None
    from memopt.pools.cuda import memory_allocated  # torch's raises under an installed memopt arena

    torch.cuda.synchronize(device)
    if clear_workspaces:
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
    return memory_allocated(device)


def _in_call_order(recorder: _Recorder, units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Sort the recorder's records and the units by first call (units never called last), and name the calls
    of a module called several times ``path#0``, ``path#1``, ..."""
    records = recorder.records
    order = sorted(range(len(records)), key=lambda i: (records[i].order is None, records[i].order or 0, i))
    recorder.records = [records[i] for i in order]
    units = [units[i] for i in order]
    repeated = {split_name(name)[0] for name, _ in units if split_name(name)[1] is not None}
    return [(call_name(name, 0) if name in repeated else name, module) for name, module in units]


def _count_calls(model: nn.Module, sample) -> dict[str, int]:
    """Calls of each module (by path) in one forward on ``sample``, without gradients; leaves no trace."""
    counts: dict[str, int] = {}
    hooks = [module.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
             for name, module in model.named_modules() if name]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    device = _model_device_of(model)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type), \
                torch.no_grad():
            _first_call(model, sample)
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return counts


def _model_device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))


def _check_model(model: nn.Module, warn_eval: bool) -> None:
    """Refuse models a training step cannot run on, and warn about an eval-mode profile."""
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"memopt: {type(model).__name__} is on the meta device ({meta!r} has no data), so no step can run; load "
            "its weights first, or plan it without them: memopt plan CONFIG --seq N (memopt.fake_profile)")
    if warn_eval and not model.training:
        warn(
            f"memopt: {type(model).__name__} is in eval mode, so dropout is off in the profiled step; call "
            "model.train() before memopt.optimize if it trains in train mode")


def _first_call(model: nn.Module, sample):
    """``run_model``, with the way a sample is passed named when the model cannot take it."""
    try:
        return run_model(model, sample)
    except TypeError as exc:
        how = ("model(**sample)" if isinstance(sample, dict) else "model(*sample)"
               if isinstance(sample, (tuple, list)) else "model(sample)")
        raise TypeError(
            f"memopt: calling the model on the sample as {how} failed: {exc}. Pass exactly the model's inputs: a "
            "tensor, a tuple of positional inputs or a dict of keyword inputs; targets the model does not take "
            "go to MemoptConfig(loss_fn=lambda output, sample: ...), which receives the whole sample") from exc


def _describe(sample) -> str:
    shapes = [f"{tuple(t.shape)}" for t in tree_leaves(sample) if isinstance(t, torch.Tensor)]
    return ", ".join(shapes)
