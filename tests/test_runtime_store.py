"""The host store's CUDA path, run on CPU tensors through fake streams and events (``HostStore(ops=...)``).

What these fakes stand for: a CUDA event whose copy is still running answers ``query()`` with False until the
test says the copy is done, and a call that would make the CPU wait for the GPU (``Event.synchronize``,
``Stream.synchronize``, ``torch.cuda.synchronize``, ``.item()``) is written down; no tensor is lent to another
stream by ``record_stream`` (the fakes have none), which kept memory taken while the CPU ran ahead of the GPU.
The real CUDA calls are checked in test_runtime_cuda.py.
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import memopt
from memopt.graph import Mode
from memopt.runtime import hooks as runtime_hooks
from memopt.runtime.engine import UnitPolicy
from memopt.runtime.hooks import Runtime
from memopt.runtime.store import CudaOps, HostStore
from memopt.testing import TinyMLP, max_difference


class FakeEvent:
    def __init__(self, ops: FakeOps) -> None:
        self.ops, self.done, self.stream = ops, False, None

    def record(self, stream=None) -> None:
        self.stream = stream
        self.ops.events.append(self)

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.ops.blocked.append("Event.synchronize")


class FakeStream:
    def __init__(self, ops: FakeOps, name: str) -> None:
        self.ops, self.name = ops, name

    def wait_stream(self, other) -> None:
        self.ops.waits.append((self.name, other))

    def wait_event(self, event) -> None:
        assert isinstance(event, FakeEvent)
        self.ops.waits.append((self.name, event))

    def synchronize(self) -> None:
        self.ops.blocked.append(f"{self.name}.synchronize")


class FakeOps:
    """``CudaOps`` for CPU tensors: copies run at once, but their events stay pending until ``finish()``."""

    def __init__(self, device=torch.device("cpu")) -> None:
        self.device = device
        self.events: list[FakeEvent] = []
        self.blocked: list[str] = []
        self.waits: list[tuple[str, FakeEvent]] = []  # (waiting stream, event): GPU-side waits, never the CPU's
        self.pinned: list[tuple[int, int]] = []
        self.unpinned: list[int] = []
        self.compute = FakeStream(self, "compute")
        self.active = self.compute  # the stream work goes to (``use``)
        self.streams = 0

    def stream(self):
        self.streams += 1
        return FakeStream(self, f"side{self.streams}")

    def event(self):
        return FakeEvent(self)

    def current_stream(self):
        return self.active

    @contextlib.contextmanager
    def use(self, stream):
        before, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = before

    def pin(self, buffer) -> bool:
        self.pinned.append((buffer.data_ptr(), buffer.numel() * buffer.element_size()))
        return True

    def unpin(self, pointer: int) -> None:
        self.unpinned.append(pointer)

    def finish(self) -> None:
        for event in self.events:
            event.done = True


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that copy a device value to the CPU and so wait for the GPU (``.item()``, ``bool(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fake_ops(monkeypatch):
    """A Runtime's store built with fake CUDA ops: the asynchronous path (lookahead, events) on CPU."""
    ops = FakeOps()
    monkeypatch.setattr(runtime_hooks, "HostStore", lambda device, capacity: HostStore(device, capacity, ops=ops))
    return ops


def _swap_all(n: int) -> list[UnitPolicy]:
    return [UnitPolicy(Mode.SWAP, swap_tensors=frozenset(range(16))) for _ in range(n)]


def _swapped_mlp(depth: int) -> tuple[TinyMLP, Runtime]:
    """A TinyMLP whose every block is swapped, its runtime installed."""
    torch.manual_seed(0)
    model = TinyMLP(depth=depth)
    runtime = Runtime(model, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], _swap_all(depth),
                      host_capacity_bytes=1 << 24)
    runtime.install()
    return model, runtime


def _step(model, x) -> None:
    model(x).backward()


# -- finding 1: only tensors on the store's device are swapped ------------------------------------------------

class _SavesSeed(torch.autograd.Function):
    """Saves a scalar off the compute device beside its input, as flash attention saves its CPU RNG seed."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x, torch.zeros((), dtype=torch.int64, device="meta"))
        return x * x

    @staticmethod
    def backward(ctx, grad):
        x, seed = ctx.saved_tensors
        assert seed.device.type == "meta"
        return 2 * x * grad


class _SeedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return _SavesSeed.apply(self.lin(x))


class _SeedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_SeedBlock() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["cpu-store", "cuda-path"])
def test_a_tensor_off_the_device_is_kept_not_swapped(asynchronous, request):
    ops = request.getfixturevalue("fake_ops") if asynchronous else None
    x = torch.randn(2, 128, 64)
    torch.manual_seed(0)
    reference = _SeedModel()
    _step(reference, x)
    torch.manual_seed(0)
    model = _SeedModel()
    runtime = Runtime(model, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], _swap_all(3),
                      host_capacity_bytes=1 << 22)
    runtime.install()
    _step(model, x)
    stats = runtime.stats()
    blocked = list(ops.blocked) if ops is not None else []
    runtime.remove()
    runtime.close()
    assert stats["off_device_bytes"] == 3 * 8  # the three seeds stayed where they were
    assert stats["swapped_bytes_total"] > 0 and stats["refused_bytes"] == 0
    assert max_difference([p.grad for p in reference.parameters()], [p.grad for p in model.parameters()]) == 0.0
    assert blocked == []


def test_the_profiler_counts_a_tensor_off_the_device_as_no_device_bytes():
    graph = memopt.profile(_SeedModel(), torch.randn(2, 128, 64), hardware=memopt.Hardware.preset("cpu"))
    for unit in graph.units:
        # Saved: the linear's input, its output (the Function's input) and the seed on "meta".
        assert sorted(unit.tensor_bytes)[0] == 0 and len(unit.tensor_bytes) == 3, unit.tensor_bytes


# -- finding 6: releasing a host block never waits for the GPU ------------------------------------------------

def test_no_hook_waits_for_the_gpu(fake_ops, monkeypatch):
    """A training step with every unit swapped: no pack or unpack hook, no entry's release, no prefetch calls
    ``synchronize`` (event, stream or device) or reads a device value on the CPU; the host blocks of copies
    still running stay taken until their events say done, and are freed then without waiting."""
    device_syncs: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: device_syncs.append("torch.cuda.synchronize"))
    model, runtime = _swapped_mlp(4)
    store = runtime.store
    with _HostSyncs() as syncs:
        _step(model, torch.randn(2, 128, 64))
    assert fake_ops.blocked == [] and device_syncs == [] and syncs.calls == []
    # Autograd freed every entry, but no copy has finished: their host blocks wait, the CPU does not.
    assert store.stats()["host_pending_blocks"] > 0 and store.arena.stats().allocated_bytes > 0
    fake_ops.finish()
    assert store.reclaim() == 0
    assert store.arena.stats().allocated_bytes == 0
    assert fake_ops.blocked == []
    runtime.remove()
    runtime.close()


def test_a_swapped_tensors_device_memory_goes_at_the_end_of_the_next_unit():
    """What the simulator counts as "swap in flight": unit u's copied-out tensors stay on the device through
    unit u + 1's forward; at its end the compute stream waits for their copies (on the GPU) and they go."""
    ops = FakeOps()
    store = HostStore(torch.device("cpu"), 1 << 20, ops=ops)
    compute_waits = lambda: [(w, e) for w, e in ops.waits if w == "compute"]  # noqa: E731
    tensor = torch.randn(256)
    alive = weakref.ref(tensor)
    entry = store.put(tensor)
    del tensor
    store.end_unit()  # unit u ends: its copy may still read the tensor
    assert alive() is not None and compute_waits() == []
    later = torch.randn(256)
    store.put(later)
    store.end_unit()  # unit u + 1 ends: the compute stream waits for u's copy, then u's tensor goes
    assert alive() is None and compute_waits() == [("compute", entry.d2h_event)]
    assert ops.blocked == []  # the CPU never waited
    store.end_forward()  # the forward ended: the last unit's go too, after one wait on the last copy
    assert len(compute_waits()) == 2 and compute_waits()[-1][1] is ops.events[-1]


def test_swapped_units_hold_their_device_memory_one_unit_in_a_step(fake_ops):
    """In a step with every unit swapped: as unit u's forward starts, nothing unit u - 2 copied out is held,
    and the store holds what unit u - 1 copied out; after the forward, it holds nothing."""
    model, runtime = _swapped_mlp(4)
    store = runtime.store
    current = [-1]
    refs: dict[int, list] = {}
    store_put = store.put

    def put(tensor):
        refs.setdefault(current[0], []).append(weakref.ref(tensor))
        return store_put(tensor)

    store.put = put
    seen: list[tuple[int, bool, bool]] = []

    def starts(index):
        current[0] = index
        gone = all(r() is None for u, rs in refs.items() if u <= index - 2 for r in rs)
        held = {id(t) for t in store._copied}
        before = all(r() is not None and id(r()) in held for r in refs.get(index - 1, []))
        seen.append((index, gone, before))

    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda _m, _a, index=index: starts(index))
    loss = model(torch.randn(2, 128, 64))
    assert store._copying == [] and store._copied == []
    loss.backward()
    assert fake_ops.blocked == []  # the waits were the GPU's (close() below may synchronise: outside a step)
    runtime.remove()
    runtime.close()
    assert seen == [(0, True, True), (1, True, True), (2, True, True), (3, True, True)], seen
    assert all(len(refs[u]) > 0 for u in range(4))


def test_a_copy_back_lands_in_the_compute_streams_memory_and_waits_for_its_work(monkeypatch):
    """The device copy of a prefetch is allocated while the compute stream is current (its pool: freed, the
    memory is the compute stream's again at once), and the copy stream first waits for the compute stream's
    queued work, then the D2H copy; a fetch makes the compute stream wait for the copy. A copy back that is
    never fetched makes the compute stream wait for it before its memory goes."""
    ops = FakeOps()
    store = HostStore(torch.device("cpu"), 1 << 20, ops=ops)
    streams_at_empty: list[str] = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (streams_at_empty.append(ops.active.name), empty(*a, **k))[1])
    entry = store.put(torch.randn(64))
    ops.waits.clear()  # the D2H stream's wait for the compute stream
    store.prefetch(entry)
    assert streams_at_empty == ["compute"]
    h2d = ops.events[-1].stream
    assert [(w, o.name if isinstance(o, FakeStream) else o) for w, o in ops.waits] == [
        (h2d.name, "compute"), (h2d.name, entry.d2h_event)]
    ops.waits.clear()
    store.fetch(entry)
    assert ops.waits == [("compute", entry.h2d_event)]
    other = store.put(torch.randn(64))
    store.prefetch(other)
    copy_back = other.h2d_event
    ops.waits.clear()
    del other  # autograd freed it before its backward (a graph dropped): the compute stream waits for the copy
    assert ops.waits == [("compute", copy_back)]
    assert ops.blocked == []


def test_release_frees_at_once_what_is_done_and_the_rest_when_asked():
    ops = FakeOps()
    store = HostStore(torch.device("cpu"), 1 << 20, ops=ops)
    entries = [store.put(torch.full((256,), float(i))) for i in range(3)]
    entries[0].d2h_event.done = True
    del entries[0]
    assert store.arena.stats().live_blocks == 2  # done: freed as it died
    del entries[:]
    assert store.arena.stats().live_blocks == 2 and store.stats()["host_pending_blocks"] == 2
    assert store.reclaim() == 2  # asks, does not wait
    ops.finish()
    assert store.reclaim() == 0 and store.arena.stats().live_blocks == 0
    assert ops.blocked == []


def test_a_put_reclaims_finished_blocks_before_refusing():
    ops = FakeOps()
    store = HostStore(torch.device("cpu"), 1 << 16, ops=ops)
    entry = store.put(torch.zeros(40 << 10, dtype=torch.uint8))
    del entry
    assert store.stats()["host_pending_blocks"] == 1
    assert store.put(torch.zeros(40 << 10, dtype=torch.uint8)) is None  # still copying: refused, kept on device
    ops.finish()
    entry = store.put(torch.zeros(40 << 10, dtype=torch.uint8))
    assert entry is not None and store.stats()["host_pending_blocks"] == 0
    assert store.stats()["refused_bytes"] == 40 << 10


def test_put_fetch_round_trip_on_the_asynchronous_path():
    ops = FakeOps()
    store = HostStore(torch.device("cpu"), 1 << 20, ops=ops)
    tensor = torch.randn(64, 32)
    entry = store.put(tensor)
    store.prefetch(entry)
    store.prefetch(entry)  # started already: no second copy
    assert torch.equal(store.fetch(entry), tensor)
    store.prefetch(entry)  # fetched: no copy back again
    assert store.stats()["fetched_bytes_total"] == store.stats()["swapped_bytes_total"] == tensor.numel() * 4
    assert [e.stream.name for e in ops.events] == ["side1", "side2"]  # D2H on one side stream, H2D on the other


def test_a_second_fetch_copies_back_again():
    """A graph backpropagated twice (retain_graph=True) fetches a swapped tensor twice: the second gets the data,
    not the None a fetched entry's prefetch guard would leave."""
    store = HostStore(torch.device("cpu"), 1 << 20, ops=FakeOps())
    tensor = torch.randn(64, 32)
    entry = store.put(tensor)
    assert torch.equal(store.fetch(entry), tensor)
    assert torch.equal(store.fetch(entry), tensor)


# -- finding 8: the pinned arena is exactly the size asked for ------------------------------------------------

def test_host_arena_is_pinned_at_its_exact_size_and_unpinned_on_close():
    ops = FakeOps()
    capacity = (3 << 20) + 4096 + 48  # not a power of two: torch.empty(pin_memory=True) would make it 4 MiB
    store = HostStore(torch.device("cpu"), capacity, ops=ops)
    buffer = store.arena.buffer
    assert ops.pinned == [(buffer.data_ptr(), capacity)] and buffer.numel() == capacity
    assert not buffer.is_pinned()  # an ordinary allocation, registered in place (here: by the fake)
    assert store.stats()["host_pinned"] is True
    store.close()
    assert ops.unpinned == [buffer.data_ptr()]
    # Waiting is allowed in close() (handle.remove(), outside hooks): the copy streams drain before unpinning.
    assert ops.blocked == ["side1.synchronize", "side2.synchronize"]


class _FakeCudart:
    def __init__(self, status: int = 0) -> None:
        self.status, self.calls = status, []

    def cudaHostRegister(self, pointer, nbytes, flags):
        self.calls.append(("register", pointer, nbytes, flags))
        return self.status

    def cudaHostUnregister(self, pointer):
        self.calls.append(("unregister", pointer))
        return 0


def test_cuda_ops_register_the_exact_bytes_through_cudart(monkeypatch):
    cudart = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    buffer = torch.empty((5 << 20) + 16, dtype=torch.uint8)
    ops = CudaOps(torch.device("cuda", 0))
    assert ops.pin(buffer) is True
    ops.unpin(buffer.data_ptr())
    assert cudart.calls == [("register", buffer.data_ptr(), (5 << 20) + 16, 0), ("unregister", buffer.data_ptr())]


def test_a_refused_registration_warns_and_copies_stay_correct(monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(status=2))  # cudaErrorMemoryAllocation
    with pytest.warns(UserWarning, match="page-locking"):
        assert CudaOps(torch.device("cuda", 0)).pin(torch.empty(4096, dtype=torch.uint8)) is False


# -- finding 7: prefetch follows backward progress -------------------------------------------------------------

def test_prefetch_starts_as_the_backward_of_the_unit_after_begins(fake_ops):
    """Lookahead 1, units 0-3 with unit 2 kept: each swapped unit's copy back starts when the gradient of the
    next unit's output arrives (the loss's, for the last), before that unit's backward runs; a kept unit, which
    never unpacks, starts its predecessor's copy all the same. Before, copies began at a unit's first unpack:
    the last unit got no head start and a kept unit none for the unit before it."""
    x = torch.randn(2, 128, 64)
    torch.manual_seed(0)
    reference = TinyMLP(depth=4)
    _step(reference, x)
    torch.manual_seed(0)
    model = TinyMLP(depth=4)
    policies = _swap_all(4)
    policies[2] = UnitPolicy(Mode.KEEP)
    runtime = Runtime(model, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], policies,
                      host_capacity_bytes=1 << 24, lookahead=1)
    runtime.install()
    log: list[tuple[str, int]] = []
    owner: dict[int, int] = {}
    store_prefetch = runtime.store.prefetch

    def prefetch(entry):
        started = ("copy back", owner[id(entry)])
        if entry.device_copy is None and not entry.fetched and started not in log:
            log.append(started)  # the unit's first entry copied back
        store_prefetch(entry)

    runtime.store.prefetch = prefetch
    def watch(index: int, out: torch.Tensor) -> None:
        out.register_hook(lambda grad: log.append(("grad", index)))

    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda _module, _args, out, index=index: watch(index, out))
    loss = model(x)
    for index in (0, 1, 3):
        for entry in runtime.frames[index]().entries.values():
            owner[id(entry)] = index
    loss.backward()
    stats = runtime.stats()
    runtime.remove()
    runtime.close()
    assert stats["fetched_bytes_total"] == stats["swapped_bytes_total"] > 0  # every entry copied back once
    assert _ordered(log), log
    # Exactly: the loss's gradient starts unit 3's copy; unit 2's (kept) output gradient starts unit 1's.
    assert log == [("copy back", 3), ("grad", 3), ("copy back", 1), ("grad", 2), ("copy back", 0), ("grad", 1),
                   ("grad", 0)], log
    assert max_difference([p.grad for p in reference.parameters()], [p.grad for p in model.parameters()]) == 0.0


def _ordered(log: list[tuple[str, int]]) -> bool:
    """Every swapped unit u (0, 1, 3) copied back once, before the gradient of unit u + 1's output arrived
    (before unit 3's own, for the last unit)."""
    copies = [u for kind, u in log if kind == "copy back"]
    if sorted(copies) != [0, 1, 3]:
        return False
    position = {entry: i for i, entry in enumerate(log)}
    return all(position[("copy back", u)] < position[("grad", min(u + 1, 3))] for u in (0, 1, 3))


def test_no_lookahead_and_no_gradient_hooks_on_the_synchronous_path():
    """On CPU a copy back is a clone: starting it early only holds memory, so it waits for the unit's backward."""
    model = TinyMLP(depth=3)
    runtime = Runtime(model, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], _swap_all(3),
                      host_capacity_bytes=1 << 24)
    runtime.install()
    out = model(torch.randn(2, 128, 64))
    assert out._backward_hooks is None or not out._backward_hooks
    assert not runtime.store.asynchronous
    out.backward()
    runtime.remove()
    runtime.close()


def test_a_hugging_face_model_output_starts_the_last_units_copy(fake_ops):
    """The loss inside a ``ModelOutput`` starts backward: the last decoder layer's copy back begins then."""
    pytest.importorskip("transformers")
    from memopt.testing import hf_causal_lm, hf_sample

    sample = hf_sample(seq=64)
    reference = hf_causal_lm("llama")
    reference(**sample).loss.backward()
    model = hf_causal_lm("llama")
    layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    runtime = Runtime(model, layers, _swap_all(len(layers)), host_capacity_bytes=1 << 24)
    runtime.install()
    started: list[str] = []
    store_prefetch = runtime.store.prefetch
    runtime.store.prefetch = lambda entry: (started.append("copy back"), store_prefetch(entry))[1]
    out = model(**sample)
    out.loss.grad_fn.register_prehook(lambda grad_outputs: started.append("loss backward"))
    out.loss.backward()
    runtime.remove()
    runtime.close()
    assert started[0] == "copy back" and "loss backward" in started, started[:3]
    assert max_difference([p.grad for p in reference.parameters()], [p.grad for p in model.parameters()]) == 0.0
