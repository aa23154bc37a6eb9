"""Hardware figures the planner and the roofline model need; presets and a measurement of this machine."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

__all__ = ["Hardware"]

_GiB = 1024**3


@dataclass(frozen=True)
class Hardware:
    """One accelerator and the host beside it.

    Args:
        name (str): preset or device name.
        device_bytes (int): accelerator memory, bytes.
        host_bytes (int): host memory memopt may use for swapped activations, bytes.
        h2d_bytes_per_s (float): pinned host-to-device copy bandwidth, bytes/s.
        d2h_bytes_per_s (float): pinned device-to-host copy bandwidth, bytes/s.
        peak_flops_per_s (float): dense matmul throughput at the training dtype, FLOP/s.
        mem_bytes_per_s (float): device memory bandwidth, bytes/s.
        async_copies (bool, default True): copies to and from the host overlap compute (CUDA side
            streams). False on CPU, where a swap is a synchronous memcpy.
        unified_memory (bool, default False): the host memory is the device memory (a CPU, Apple MPS), so a
            swapped byte still takes device memory: the planner never swaps there, and the simulator counts
            a swapped tensor's copy where the tensor was.
        matmul_efficiency (float, default 1.0): share of ``peak_flops_per_s`` the matmuls of a training step
            reach (the roofline model's time for them is divided by it).
        attention_efficiency (float, default 1.0): share of ``peak_flops_per_s`` fused attention reaches.
        memory_efficiency (float, default 1.0): share of ``mem_bytes_per_s`` memory-bound kernels reach.
    """

    name: str
    device_bytes: int
    host_bytes: int
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    peak_flops_per_s: float
    mem_bytes_per_s: float
    async_copies: bool = True
    unified_memory: bool = False
    matmul_efficiency: float = 1.0
    attention_efficiency: float = 1.0
    memory_efficiency: float = 1.0

    def __post_init__(self) -> None:
        for key in ("matmul_efficiency", "attention_efficiency", "memory_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"Hardware.{key} must be in (0, 1], got {getattr(self, key)!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name not in ("name", "async_copies", "unified_memory") and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"Hardware.{field.name} must be a positive number, got {value!r}")

    @classmethod
    def preset(cls, name: str) -> Hardware:
        """A named preset: one of ``Hardware.preset_names()``.

        Raises:
            ValueError: unknown name; the message lists the known ones.
        """
        key = name.lower().replace("_", "-")
        if key not in _PRESETS:
            raise ValueError(f"unknown GPU preset {name!r}; choose one of {', '.join(sorted(_PRESETS))}")
        return _PRESETS[key]

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    @classmethod
    def measure(cls, device: str | None = None) -> Hardware:
        """Read this machine's figures: memory sizes, copy bandwidths and matmul/memory throughput.

        Takes about a second. On CPU the "device" is host memory and copies are memcpy.

        Args:
            device (str | None, default None): ``"cuda"``, ``"cuda:1"`` or ``"cpu"``; None picks CUDA when present.
        """
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if str(dev) in _MEASURED:
            return _MEASURED[str(dev)]
        # Measuring must not move the user's RNG streams: runs with and without memopt stay identical.
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type=dev.type):
            _MEASURED[str(dev)] = cls._measure(dev)
        return _MEASURED[str(dev)]

    @classmethod
    def _measure(cls, dev) -> Hardware:
        import torch

        host_bytes = _host_memory_bytes()
        cuda = dev.type == "cuda"
        if cuda:
            props = torch.cuda.get_device_properties(dev)
            device_bytes, name = int(props.total_memory), props.name
            dtype = torch.bfloat16
        else:
            device_bytes, name = host_bytes, "cpu"
            dtype = torch.float32
        # Work long enough to time. On an H100 a 64 MiB copy takes about a millisecond and a 2048^3 matmul
        # about 20 us, mostly launch and clock ramp-up (30-50 % under the true rates); 256 MiB copies and
        # 8192^3 matmuls run for milliseconds each and are timed on the device by CUDA events, in batches
        # (checked on a GPU by tests/test_profiler_cuda.py::test_measure_on_cuda_is_repeatable_and_near_the_card).
        n_bytes = 256 << 20 if cuda else 16 << 20
        side = 8192 if cuda else 256
        events = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else None  # noqa: E731
        timing = {"events": events, "batch": 4, "repeats": 3} if cuda else {"batch": 1, "repeats": 5}
        with torch.cuda.device(dev) if cuda else contextlib.nullcontext():
            host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=cuda)
            dev_buf = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
            dev_buf2 = torch.empty_like(dev_buf)
            h2d = n_bytes / _seconds_per_call(lambda: dev_buf.copy_(host, non_blocking=True), **timing)
            d2h = n_bytes / _seconds_per_call(lambda: host.copy_(dev_buf, non_blocking=True), **timing)
            mem = 2 * n_bytes / _seconds_per_call(lambda: dev_buf2.copy_(dev_buf), **timing)
            del host, dev_buf, dev_buf2
            a = torch.randn(side, side, device=dev, dtype=dtype)
            flops = 2 * side**3 / _seconds_per_call(lambda: a @ a, **timing)
            del a
            if cuda:
                torch.cuda.synchronize(dev)
                # The pinned buffer went back to torch's host cache, which would keep it for good.
                empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
                if empty_host_cache is not None:
                    empty_host_cache()
        return cls(name, device_bytes, host_bytes // 2, h2d, d2h, flops, mem, async_copies=cuda,
                   unified_memory=dev.type in ("cpu", "mps"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Hardware:
        data = dict(data)
        # Files written before the field existed: only a host-memory "device" lacked asynchronous copies.
        data.setdefault("unified_memory", not data.get("async_copies", True))
        return cls(**data)


_MEASURED: dict[str, Hardware] = {}


def _seconds_per_call(fn, events=None, *, batch: int = 4, repeats: int = 3) -> float:
    """Median seconds of one ``fn()``, over ``repeats`` batches of ``batch`` back-to-back calls after one warm-up
    batch. ``events`` makes timing events (CUDA): each batch is timed on the device between two of them, so
    neither launch latency nor a host synchronisation counts; None times on the CPU wall clock."""
    for _ in range(batch):
        fn()
    times = []
    for _ in range(repeats):
        if events is None:
            start_s = time.perf_counter()
            for _ in range(batch):
                fn()
            times.append((time.perf_counter() - start_s) / batch)
            continue
        start, end = events(), events()
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / batch)
    return max(sorted(times)[len(times) // 2], 1e-9)


def _host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * _GiB


# Efficiencies of the GPU presets: the share of the preset's dense matmul rate (itself what a large square bf16
# matmul reaches: 780 TFLOP/s measured on an H100 SXM with an 8192^3 matmul, about 79 % of its 989 TFLOP/s
# datasheet peak) and of its memory bandwidth that a training step's kernels reach, from public benchmarks,
# not fitted to any one run:
# - matmul 0.85: the rectangular GEMMs of a transformer layer (tokens x hidden x 2.75 hidden and the like) run
#   at 80-90 % of a square GEMM's rate in cuBLAS at these sizes;
# - attention 0.7: PyTorch's scaled_dot_product_attention on Hopper dispatches to fused kernels (cuDNN's,
#   FlashAttention's) that run causal attention at long sequences at 500-650 TFLOP/s forward and backward (the
#   cuDNN and FlashAttention-3 published H100 comparisons), about 0.7 of the dense matmul rate; FlashAttention-2
#   reaches a similar share of an A100's;
# - memory 0.8: elementwise and reduction kernels (norms, activations, softmax, the optimizer's foreach ops)
#   stream at 75-85 % of HBM bandwidth (the STREAM-like figures vendors publish for HBM3 and HBM2e).
_GPU = dict(matmul_efficiency=0.85, attention_efficiency=0.7, memory_efficiency=0.8)

_PRESETS = {
    # Pinned-copy bandwidths are what a single process sees, not the link's nominal figure.
    "h100": Hardware("h100", 80 * _GiB, 512 * _GiB, 55e9, 55e9, 780e12, 3.0e12, **_GPU),
    "h200": Hardware("h200", 141 * _GiB, 1024 * _GiB, 55e9, 55e9, 800e12, 4.4e12, **_GPU),
    "a100-80g": Hardware("a100-80g", 80 * _GiB, 512 * _GiB, 24e9, 24e9, 280e12, 1.8e12, **_GPU),
    "a100-40g": Hardware("a100-40g", 40 * _GiB, 256 * _GiB, 24e9, 24e9, 280e12, 1.4e12, **_GPU),
    "l4": Hardware("l4", 24 * _GiB, 128 * _GiB, 12e9, 12e9, 110e12, 0.27e12, **_GPU),
    "rtx4090": Hardware("rtx4090", 24 * _GiB, 64 * _GiB, 22e9, 22e9, 150e12, 0.9e12, **_GPU),
    "cpu": Hardware("cpu", 16 * _GiB, 16 * _GiB, 10e9, 10e9, 0.2e12, 20e9, async_copies=False, unified_memory=True),
}
