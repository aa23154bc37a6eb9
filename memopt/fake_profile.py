"""Fake profile: the live profiler's walk over a model of fake tensors, timed by a roofline model.

A Hugging Face config (a ``config.json``, a built-in preset name, a dict or a ``PretrainedConfig``) is
built under ``FakeTensorMode``, so no weight is allocated: a 7B model traces on a laptop CPU in
seconds. ``memopt.profiler.profile_model`` then runs its usual safe-mode step on it, with the meter
counting fake storages and the clock advanced by a ``RooflineMode`` for the target ``Hardware``.
Model states follow the training setup (dtype, optimizer, ZeRO stage and world size), not the
profiled module's own parameter bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MemoptConfig
from .errors import MemoptError
from .fake_adapters import add_lora, dequantized_bytes, nf4_bytes
from .graph import TrainingGraph
from .precision import OPTIMIZERS, optimizer_state_bytes, precision, step_traffic_bytes, step_workspace_bytes
from .zero import param_groups, shard_bytes, zero3_gathered_bytes, zero_share
from .hardware import Hardware

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DTYPE_BYTES",
    "ModelConfigError",
    "ModelStates",
    "TrainingSetup",
    "analytic_param_count",
    "attention_implementation",
    "fake_profile",
    "resharded",
    "load_model_config",
    "model_states",
    "parameter_count",
    "preset_names",
]

PRESETS_DIR = Path(__file__).resolve().parent / "presets"

#: Bytes per element of the training dtypes ``TrainingSetup.dtype`` accepts.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

#: The precision convention a bare ``dtype`` stands for.
DTYPE_PRECISION = {"bf16": "bf16-mixed", "fp16": "fp16-mixed", "fp32": "32-true"}


#: Attention implementations a model can be traced with under fake tensors, the default first (flash
#: attention needs a GPU, flex attention real tensors).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class ModelConfigError(MemoptError, ValueError):
    """A model could not be planned from its config: unknown preset, malformed or unsupported config."""


def preset_names() -> list[str]:
    """Names of the model configs shipped with memopt (``memopt/presets/*.json``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


@dataclass
class TrainingSetup:
    """What one training step looks like, for the fake profile and the model-state count.

    Args:
        seq_len (int): tokens per sequence.
        batch_size (int, default 1): sequences per step on one GPU.
        dtype (str, default "bf16"): parameter, gradient and activation dtype: ``bf16``, ``fp16`` or ``fp32``;
            without ``precision`` it stands for ``bf16-mixed``, ``fp16-mixed`` or ``32-true``.
        optimizer (str, default "adamw"): one of ``memopt.precision.OPTIMIZERS``.
        zero_stage (int, default 0): ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also
            parameters, each over ``world_size`` GPUs.
        world_size (int, default 1): data-parallel GPUs the states are sharded over.
        precision (str | None, default None): the precision convention (``memopt.precision.PRECISIONS``); it
            sets ``dtype`` to its parameters' dtype.
        grad_accumulation (int, default 1): micro-batches per optimizer step; above 1 the gradients are held
            through every step.
        lora_rank (int, default 0): LoRA adapters of this rank on every linear but the LM head, the rest
            frozen (``memopt.fake_adapters``); 0 trains the whole model.
        qlora (bool, default False): the LoRA base weights in bitsandbytes' NF4 (needs ``lora_rank``).
        qst (bool, default False): Quantized Side Tuning (``memopt.qst`` with its default ``QSTConfig``): every
            linear but the LM head in NF4 and frozen, a side network 16 times narrower the only thing that
            trains; not with ``lora_rank``.
    """

    seq_len: int
    batch_size: int = 1
    dtype: str = "bf16"
    optimizer: str = "adamw"
    zero_stage: int = 0
    world_size: int = 1
    precision: str | None = None
    grad_accumulation: int = 1
    lora_rank: int = 0
    qlora: bool = False
    qst: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0, got {self.lora_rank!r}")
        if self.qlora and not self.lora_rank:
            raise ValueError("qlora trains LoRA adapters on a 4-bit base: give their rank too (--lora 16 --qlora)")
        if self.qst and self.lora_rank:
            raise ValueError(f"qst trains a side network beside a frozen 4-bit model, lora_rank={self.lora_rank} "
                             "adapters inside it: choose one (--qst, or --lora R [--qlora])")
        if self.precision is not None:
            self.dtype = precision(self.precision).compute
        else:
            self.precision = DTYPE_PRECISION.get(self.dtype, self.dtype)
        for key in ("seq_len", "batch_size", "world_size", "grad_accumulation"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.zero_stage and self.world_size == 1:
            raise ValueError(f"zero_stage={self.zero_stage} shards over world_size GPUs but world_size is 1; "
                             "pass world_size >= 2 or zero_stage=0")


@dataclass(frozen=True)
class ModelStates:
    """Parameter, gradient and optimizer bytes on one GPU, and how they were counted.

    Args:
        n_params (int): trainable parameters (tied weights once).
        param_bytes (int): parameter bytes on one GPU, after sharding.
        grad_bytes (int): gradient bytes on one GPU, after sharding.
        optimizer_bytes (int): optimizer bytes on one GPU (states and fp32 master copy), after sharding.
        convention (str): the counting rule in words, for reports.
    """

    n_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    convention: str

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def model_states(n_params: int, setup: TrainingSetup, shapes: list[tuple[int, ...]] | None = None,
                 frozen_bytes: int = 0) -> ModelStates:
    """Count model states for ``n_params`` trainable parameters under ``setup``.

    Parameters, gradients and optimizer states as ``setup.precision`` stores them (``memopt.precision``):
    ``bf16-mixed`` and ``fp16-mixed`` keep 16-bit parameters and gradients, fp32 optimizer states and an fp32
    master copy; ``bf16-true`` keeps everything in bf16; ``32-true`` in fp32. ZeRO stage 1 divides the optimizer
    bytes by the world size, stage 2 also the gradients, stage 3 also the parameters (rounded up: the last rank
    holds the remainder).

    Args:
        n_params (int): trainable parameters.
        setup (TrainingSetup): precision, optimizer, ZeRO stage and world size.
        shapes (list[tuple[int, ...]] | None, default None): the trainable parameters' shapes, for optimizers
            whose states depend on them (Adafactor's factored moments, 8-bit Adam's small tensors); None counts
            one flat tensor of ``n_params``.
        frozen_bytes (int, default 0): bytes of the parameters that do not train (a LoRA or QLoRA base), as
            stored: no gradient, no optimizer state.

    Example:
        >>> s = model_states(1000, TrainingSetup(seq_len=1))
        >>> (s.param_bytes, s.grad_bytes, s.optimizer_bytes)
        (2000, 2000, 12004)
        >>> model_states(1000, TrainingSetup(seq_len=1, precision="bf16-true")).optimizer_bytes
        4004
    """
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 0:
        raise ValueError(f"n_params must be an int >= 0, got {n_params!r}")
    conv = precision(setup.precision)
    shapes = shapes if shapes is not None else [(n_params,)]
    states = optimizer_state_bytes(setup.optimizer, shapes, conv.state_bytes)
    optimizer_bytes = states + conv.master_bytes * n_params
    shards = setup.world_size

    def shard(nbytes: int, state: str) -> int:
        return zero_share(nbytes, state, setup.zero_stage, shards)

    master = f" + fp{8 * conv.master_bytes} master copy" if conv.master_bytes else ""
    convention = (f"{conv.name}: params and grads {conv.param_bytes} B/param each; {setup.optimizer} states in "
                  f"{conv.state_bytes}-byte elements{master} = {optimizer_bytes / max(n_params, 1):.2f} B/param")
    if setup.zero_stage:
        sharded = ["optimizer", "gradients", "parameters"][: setup.zero_stage]
        convention += f"; ZeRO-{setup.zero_stage} shards {', '.join(sharded)} over {shards} GPUs"
    return ModelStates(n_params=n_params, param_bytes=shard(conv.param_bytes * n_params + frozen_bytes, "parameters"),
                       grad_bytes=shard(conv.grad_bytes * n_params, "gradients"),
                       optimizer_bytes=shard(optimizer_bytes, "optimizer"),
                       convention=convention)


def optimizer_step(n_params: int, setup: TrainingSetup, shapes: list[tuple[int, ...]] | None, hardware: Hardware
                   ) -> tuple[int, float]:
    """Bytes of temporaries and seconds of one optimizer step on one GPU (multi-tensor, torch's default on CUDA;
    ZeRO-1 and above divide both by the world size)."""
    conv = precision(setup.precision)
    shapes = shapes if shapes is not None else [(n_params,)]
    shards = setup.world_size if setup.zero_stage else 1
    temporaries = step_workspace_bytes(setup.optimizer, shapes, conv.state_bytes, foreach=True)
    traffic = step_traffic_bytes(setup.optimizer, n_params, conv.state_bytes)
    if conv.master_bytes:  # the master copy's update and the cast back to 16 bits
        traffic += 3 * conv.master_bytes * n_params
    seconds = traffic / (hardware.mem_bytes_per_s * hardware.memory_efficiency)
    return shard_bytes(temporaries, shards), seconds / shards


def zero3_gathered(graph: TrainingGraph, n_params: int, dtype: str, world_size: int) -> int:
    """``zero3_gathered_bytes`` for a modelled step under DeepSpeed's default settings: each unit's
    parameters, and those outside every unit, as the groups gathered together."""
    full = DTYPE_BYTES[dtype] * n_params
    groups = param_groups([u.param_grad_bytes for u in graph.units], full)
    return zero3_gathered_bytes(groups, full, world_size, n_params)


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelConfigError(f"cannot read model config {str(path)!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"model config {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                               f"column {exc.colno}); pass a Hugging Face config.json") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"model config {str(path)!r} holds a JSON {type(data).__name__}, not an object; "
                               "pass a Hugging Face config.json")
    return data


def load_model_config(model: Any):
    """A ``transformers.PretrainedConfig`` from a preset name, a config.json path, a dict or a config.

    Args:
        model: a preset name (``preset_names()``), a path to a ``config.json`` (or a folder holding one),
            a dict of its contents, or a ``PretrainedConfig``.

    Raises:
        ModelConfigError: unknown preset, unreadable or malformed JSON, no or unknown ``model_type``, or
            values the config class rejects.
    """
    import transformers

    if isinstance(model, transformers.PretrainedConfig):
        return model
    source = "the given dict"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            data, source = _read_json(path), repr(str(path))
        elif str(model) in preset_names():
            data, source = _read_json(PRESETS_DIR / f"{model}.json"), f"preset {str(model)!r}"
        elif path.suffix == ".json" or os.sep in str(model):
            raise ModelConfigError(f"no model config at {str(model)!r}; pass a path to a config.json or a preset: "
                                   f"{', '.join(preset_names())}")
        else:
            raise ModelConfigError(f"unknown model preset {str(model)!r}; choose one of {', '.join(preset_names())}, "
                                   "or pass a path to a Hugging Face config.json")
    elif isinstance(model, dict):
        data = model
    else:
        raise ModelConfigError(f"model must be a preset name, a config.json path, a dict or a PretrainedConfig, "
                               f"got {type(model).__name__}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelConfigError(f"model config {source} has no \"model_type\"; a Hugging Face config.json names one, "
                               "e.g. \"llama\"")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelConfigError(f"model config {source}: transformers {transformers.__version__} does not know "
                               f"model_type {model_type!r}; upgrade transformers or use a supported model")
    fields = {k: v for k, v in data.items() if k != "model_type"}
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # noqa: BLE001 - config classes raise ValueError, TypeError, their own validation errors
        raise ModelConfigError(f"model config {source} is malformed: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """One line saying why transformers or torch raised ``exc``, in words where it is a limit of fake tensors."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    # The profiler's wrapping blames the sample; in a fake profile memopt made the sample, so the cause speaks.
    while str(exc).startswith("memopt:") and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, DataDependentOutputException):
        return f"its code reads a tensor's value ({exc.func}), which fake tensors do not have"
    if isinstance(exc, DynamicOutputShapeException):
        return f"its code makes a tensor whose shape depends on values ({exc.func}), which fake tensors cannot size"
    text = " ".join(str(exc).split())
    if "Couldn't swap" in text:
        return (f"its constructor converts a submodule with .to(), which torch cannot do to fake-tensor parameters "
                f"({text})")
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fake_limit(exc: BaseException) -> bool:
    """``exc`` is a limit of tracing without weights, not a fault of the config."""
    return _reason(exc).startswith("its ")


@contextmanager
def _plain_batch_masks():
    """Let Hugging Face skip mask materialisation for fake tensors as it does for real ones.

    Transformers treats a fake tensor as "tracing" and then cannot prove that the position ids hold
    one sequence per row (not packed), so it builds a (B, 1, T, T) mask and disables the causal fast
    path that a real step takes. The fake batch is made here and is never packed, so the check's answer
    is known: no packed sequences.
    """
    try:
        import transformers.masking_utils as masking
    except ImportError:
        yield
        return
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


@contextmanager
def _no_weight_init():
    """Build without initialising weights: fake weights hold no values to set, and some initialisers read
    values (``trunc_normal_`` in SigLIP or ModernBERT), which fake tensors cannot give. Tying still runs."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = original


def _causal_lm_class(hf_config):
    """The ``AutoModelForCausalLM`` class for a config; ModelConfigError when transformers has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        found = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except KeyError:
        raise ModelConfigError(
            f"model_type {hf_config.model_type!r} is not supported: memopt plans causal language models "
            "(transformers AutoModelForCausalLM) and this config has none") from None
    return found[0] if isinstance(found, (list, tuple)) else found


def attention_implementation(model: Any, requested: str | None = None) -> str:
    """The attention a causal LM is built with: ``requested``, or sdpa where its class supports it, else eager.

    Args:
        model: a preset name, a config.json path, a dict or a ``PretrainedConfig``.
        requested (str | None, default None): one of ``ATTN_IMPLEMENTATIONS``; None picks as transformers
            does by default (sdpa, falling back to eager for classes without it, e.g. Gemma-2).

    Raises:
        ModelConfigError: ``requested`` is unknown, or the model's class does not support it.

    Example:
        >>> attention_implementation("llama-7b"), attention_implementation({"model_type": "gemma2"})
        ('sdpa', 'eager')
    """
    if requested is not None and requested not in ATTN_IMPLEMENTATIONS:
        raise ModelConfigError(f"attention implementation {requested!r} is not one memopt can trace; choose "
                               f"{' or '.join(ATTN_IMPLEMENTATIONS)}, or omit it to use the model's default")
    hf_config = load_model_config(model)
    cls = _causal_lm_class(hf_config)
    supported = [name for name in ATTN_IMPLEMENTATIONS if name == "eager" or getattr(cls, "_supports_sdpa", False)]
    if requested is None:
        return supported[0]
    if requested not in supported:
        raise ModelConfigError(f"{cls.__name__} does not support attention {requested!r} in transformers; pass "
                               f"--attn-impl {supported[0]} (attn_implementation={supported[0]!r}) or omit it")
    return requested


def _build_model(hf_config, setup: TrainingSetup, attn_implementation: str):
    import torch
    import transformers

    _causal_lm_class(hf_config)
    dtype = getattr(torch, _TORCH_DTYPE[setup.dtype])
    try:
        hf_config = hf_config.__class__.from_dict(hf_config.to_dict())  # a copy: the caller's config is left as is
        hf_config.use_cache = False
        with _no_weight_init():
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                                  attn_implementation=attn_implementation)
    except Exception as exc:  # noqa: BLE001 - whatever a config makes the class raise is the user's to know
        if _fake_limit(exc):
            raise ModelConfigError(f"cannot build a {hf_config.model_type!r} model with fake tensors: {_reason(exc)}; "
                                   "memopt plan cannot model it offline, profile it live with memopt.optimize"
                                   ) from None
        raise ModelConfigError(f"cannot build a {hf_config.model_type!r} model from this config, it is malformed: "
                               f"{_reason(exc)}") from None
    return model.train()


def _position_limit(hf_config, model) -> int | None:
    """The sequence length a model with learned positions cannot exceed; None for rotary/relative ones."""
    from torch import nn

    limit = getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    learned = any(isinstance(m, nn.Embedding) and m.num_embeddings in (limit, limit + 2) for m in model.modules())
    return limit if learned else None


def _frozen_bytes(model, adapted, qlora: bool) -> tuple[int, int]:
    """Bytes of the parameters that do not train, as ``(4-bit base, the rest as built)``: under QLoRA the adapted
    base weights in NF4, every other frozen parameter (embeddings, norms, the LM head) in its own dtype."""
    quantized = {id(linear.weight) for linear in adapted} if qlora else set()
    seen: set[int] = set()
    nf4 = dense = 0
    for p in model.parameters():
        if p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quantized:
            nf4 += nf4_bytes(p.numel())
        else:
            dense += p.numel() * p.element_size()
    return nf4, dense


def _with_dequantized_weights(graph: TrainingGraph, model, extra_bytes: int | None = None) -> TrainingGraph:
    """A 4-bit base: each unit's forward, backward and checkpoint workspaces hold a dequantised bf16 weight, its
    own largest (QLoRA), or ``extra_bytes`` (QST, whose backbone runs beside units of the side network: the
    largest of the backbone, a bound)."""
    units = []
    for unit in graph.units:
        extra = (extra_bytes if extra_bytes is not None
                 else dequantized_bytes(model.get_submodule(unit.name.split("#")[0])))
        units.append(dataclasses.replace(
            unit, forward_workspace_bytes=unit.forward_workspace_bytes + extra,
            backward_workspace_bytes=unit.backward_workspace_bytes + extra,
            checkpoint_workspace_bytes=unit.checkpoint_workspace_bytes + extra))
    return dataclasses.replace(graph, units=units)


def _quantized_by_qst(model) -> list:
    """The layers ``memopt.qst`` puts in NF4: every linear (and GPT-2 ``Conv1D``) but the LM head."""
    from torch import nn

    head = model.get_output_embeddings()
    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D
        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - transformers is here whenever a config is
        pass
    return [m for m in model.modules() if isinstance(m, kinds) and m is not head]


def _with_side_network(model, name: str):
    """``apply_qst`` with its default side network on a model of fake tensors, the backbone left unquantised
    (there is no data to quantise; its bytes are counted as NF4 by ``_frozen_bytes``)."""
    from .qst import QSTConfig, apply_qst

    try:
        return apply_qst(model, QSTConfig(quantize=None))
    except ValueError as exc:
        raise ModelConfigError(f"--qst: {name}: {exc}") from None


def _trainable_shapes(model) -> list[tuple[int, ...]]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(tuple(p.shape))
    return out


def _trainable_params(model) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        key = id(p)
        if p.requires_grad and key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def parameter_count(model: Any, dtype: str = "bf16") -> int:
    """Trainable parameters of a causal LM built from its config with fake tensors (tied weights once).

    Args:
        model: a preset name, a config.json path, a dict or a ``PretrainedConfig``.
        dtype (str, default "bf16"): dtype to build in (the count does not depend on it).

    Example:
        >>> parameter_count("llama-7b")
        6738415616
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    hf_config = load_model_config(model)
    with FakeTensorMode():
        return _trainable_params(_build_model(hf_config, TrainingSetup(seq_len=1, dtype=dtype),
                                              attention_implementation(hf_config)))


def fake_profile(model: Any, setup: TrainingSetup, hardware: Hardware, config: MemoptConfig | None = None, *,
                 attn_implementation: str | None = None,
                 progress: Callable[[str], None] | None = None) -> TrainingGraph:
    """Profile one training step of a Hugging Face causal LM without its weights, for ``hardware``.

    Args:
        model: a preset name, a config.json path, a dict or a ``PretrainedConfig`` (see ``load_model_config``).
        setup (TrainingSetup): sequence length, batch, dtype, optimizer and sharding.
        hardware (Hardware): the GPU modelled; unit times come from a roofline of its figures.
        config (MemoptConfig | None, default None): unit selection; the separability probe is off in fake
            mode (it compares values, and fake tensors have none), so no unit is planned token-wise.
        attn_implementation (str | None, default None): the attention the model runs with, as on the GPU:
            ``"sdpa"`` or ``"eager"``; None picks sdpa where the model's class supports it, else eager (see
            ``attention_implementation``). Recorded as ``meta["attn_implementation"]``.
        progress (Callable[[str], None] | None, default None): called with a short status line as tracing
            proceeds.

    Returns:
        TrainingGraph: memory from the fake walk, times from the roofline, model states from ``setup``.

    Raises:
        ModelConfigError: the model cannot be built or traced from its config, does not support the
            requested attention, or the sequence is longer than its learned position table.

    Example:
        >>> g = fake_profile("gpt2", TrainingSetup(seq_len=64), Hardware.preset("h100"))
        >>> len(g.units), g.meta["n_params"]
        (12, 124439808)
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .blocks import select_units
    from .profiler import profile_model
    from .roofline import Roofline, RooflineMode

    say = progress or (lambda message: None)
    config = dataclasses.replace(config or MemoptConfig(), probe_separable=False, token_separable={})
    hf_config = load_model_config(model)
    name = str(model) if isinstance(model, (str, os.PathLike)) else getattr(hf_config, "model_type", "model")
    attention = attention_implementation(hf_config, attn_implementation)
    started = time.perf_counter()
    say(f"building {name} with fake tensors")
    roofline = RooflineMode(Roofline(hardware))
    with FakeTensorMode(), _plain_batch_masks():
        module = _build_model(hf_config, setup, attention)
        limit = _position_limit(hf_config, module)
        if limit is not None and setup.seq_len > limit:
            raise ModelConfigError(f"seq {setup.seq_len} is longer than {name}'s learned position table "
                                   f"({limit} positions); pass --seq {limit} or less")
        adapted = add_lora(module, setup.lora_rank) if setup.lora_rank else []
        if setup.qst:
            adapted = _quantized_by_qst(module)
            module = _with_side_network(module, name)
        n_params = _trainable_params(module)
        shapes = _trainable_shapes(module)
        nf4_base, frozen_dense = _frozen_bytes(module, adapted, setup.qlora or setup.qst)
        frozen = nf4_base + frozen_dense
        try:
            units = select_units(module, config.units)
        except ValueError as exc:
            raise ModelConfigError(f"{name}: {exc}") from None
        # A multimodal config keeps the vocabulary in its text config; the sample is text only.
        vocab = int(getattr(hf_config.get_text_config(), "vocab_size", 0) or getattr(hf_config, "vocab_size", 0) or 0)
        if vocab < 1:
            raise ModelConfigError(f"model config of {name} has no vocab_size; a causal LM config needs one")
        hooks = []
        for index, (_, unit) in enumerate(units):
            def announce(*_, index=index):
                say(f"tracing forward: unit {index + 1}/{len(units)}")
            hooks.append(unit.register_forward_pre_hook(announce))
        hooks.append(module.register_forward_hook(lambda *_: say("tracing backward: recomputing each unit")))
        ids = torch.randint(0, vocab, (setup.batch_size, setup.seq_len))
        sample = {"input_ids": ids, "labels": ids}
        try:
            with roofline:
                graph = profile_model(module, sample, config, hardware, clock=roofline.clock)
        except MemoptError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model fake mode cannot run is the user's to know, in one line
            raise ModelConfigError(f"{name} cannot be traced with fake tensors: {_reason(exc)}") from None
        finally:
            for hook in hooks:
                hook.remove()
    say(f"traced in {time.perf_counter() - started:.1f} s")
    if setup.qlora:
        graph = _with_dequantized_weights(graph, module)
    if setup.qst:
        graph = _with_dequantized_weights(graph, module, max(2 * w.weight.numel() for w in adapted))
    states = model_states(n_params, setup, shapes, frozen)
    step_bytes, step_s = optimizer_step(n_params, setup, shapes, hardware)
    meta = dict(graph.meta)
    meta.update({
        "model": name, "architecture": type(module).__name__, "model_type": hf_config.model_type,
        "attn_implementation": attention,
        "profiled": "fake", "timing": f"roofline of {hardware.name}", "n_params": n_params,
        "seq_len": setup.seq_len, "batch_size": setup.batch_size, "dtype": setup.dtype,
        "precision": setup.precision, "grad_accumulation": setup.grad_accumulation, "lora_rank": setup.lora_rank,
        "qlora": setup.qlora, "qst": setup.qst, "frozen_param_bytes": frozen, "nf4_base_bytes": nf4_base,
        "optimizer": setup.optimizer, "zero_stage": setup.zero_stage, "world_size": setup.world_size,
        "model_states_convention": states.convention, "trace_s": time.perf_counter() - started,
        "modelled_flops": roofline.flops, "modelled_step_s_safe_mode": roofline.elapsed_s,
    })
    limit_note = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(limit_note, int) and setup.seq_len > limit_note:
        meta["note"] = f"seq {setup.seq_len} exceeds the model's max_position_embeddings ({limit_note})"
    whole = dataclasses.replace(setup, zero_stage=0, world_size=1)
    whole_states = model_states(n_params, whole, shapes, frozen)
    meta["unsharded_states"] = {"param_bytes": whole_states.param_bytes, "grad_bytes": whole_states.grad_bytes,
                                "optimizer_bytes": whole_states.optimizer_bytes,
                                "optimizer_step_bytes": optimizer_step(n_params, whole, shapes, hardware)[0],
                                "optimizer_step_s": optimizer_step(n_params, whole, shapes, hardware)[1]}
    gathered = zero3_gathered(graph, n_params, setup.dtype, setup.world_size) if setup.zero_stage == 3 else 0
    # Plans copy the graph's meta: this lets Plan.summary split a budget into states and activations.
    return dataclasses.replace(
        graph, param_bytes=states.param_bytes, grad_bytes=states.grad_bytes, optimizer_bytes=states.optimizer_bytes,
        sharding_degree=setup.world_size if setup.zero_stage else 1, gathered_param_bytes=gathered, meta=meta,
        grads_resident=setup.grad_accumulation > 1, optimizer_step_bytes=step_bytes, optimizer_step_s=step_s)


def resharded(graph: TrainingGraph, zero_stage: int, world_size: int) -> TrainingGraph:
    """A modelled step (from ``fake_profile``) as it would be under another ZeRO stage and world size: the
    same activations, model states and optimizer step sharded as ``model_states`` and ``optimizer_step`` shard
    them, with the parameters ZeRO-3 gathers.

    Raises:
        ValueError: a graph ``fake_profile`` did not make, or a stage or world size out of range.
    """
    whole = graph.meta.get("unsharded_states")
    if not isinstance(whole, dict):
        raise ValueError("resharded needs a graph from memopt.fake_profile (its meta has no 'unsharded_states')")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    shards = world_size if zero_stage else 1

    def shard(nbytes: int, state: str) -> int:
        return zero_share(nbytes, state, zero_stage, world_size)

    n_params = graph.meta["n_params"]
    gathered = zero3_gathered(graph, n_params, graph.meta["dtype"], world_size) if zero_stage == 3 else 0
    meta = dict(graph.meta, zero_stage=zero_stage, world_size=world_size)
    return dataclasses.replace(
        graph, param_bytes=shard(whole["param_bytes"], "parameters"),
        grad_bytes=shard(whole["grad_bytes"], "gradients"), optimizer_bytes=shard(whole["optimizer_bytes"], "optimizer"), sharding_degree=shards,
        gathered_param_bytes=gathered, optimizer_step_bytes=shard(whole["optimizer_step_bytes"], "optimizer"),
        optimizer_step_s=whole["optimizer_step_s"] / shards, meta=meta)


def analytic_param_count(hf_config) -> int:
    """Parameters of a Llama-, Mistral-, Qwen2- or GPT-2-style causal LM, counted from its config alone.

    An independent check of the fake model's count: embeddings, attention (with grouped KV heads and
    biases where the family has them), gated or plain MLP, norms and the LM head (untied only).

    Raises:
        ModelConfigError: a model type this formula does not cover.
    """
    kind = hf_config.model_type
    vocab = hf_config.vocab_size
    if kind in ("llama", "mistral", "qwen2"):
        h, inter, layers = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers
        heads, kv = hf_config.num_attention_heads, hf_config.num_key_value_heads
        head_dim = getattr(hf_config, "head_dim", None) or h // heads
        attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
        if kind == "qwen2" or getattr(hf_config, "attention_bias", False):
            attn += heads * head_dim + 2 * kv * head_dim
            if getattr(hf_config, "attention_bias", False):
                attn += h
        mlp = 3 * h * inter
        per_layer = attn + mlp + 2 * h
        head = 0 if hf_config.tie_word_embeddings else vocab * h
        return vocab * h + layers * per_layer + h + head
    if kind == "gpt2":
        h, layers, positions = hf_config.n_embd, hf_config.n_layer, hf_config.n_positions
        inner = hf_config.n_inner or 4 * h
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h) + 4 * h
        return vocab * h + positions * h + layers * per_layer + 2 * h
    raise ModelConfigError(f"no analytic parameter formula for model_type {kind!r}")

