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
from .graph import TrainingGraph
from .zero import param_groups, shard_bytes, zero3_gathered_bytes
from .hardware import Hardware

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DTYPE_BYTES",
    "OPTIMIZER_STATES",
    "ModelConfigError",
    "ModelStates",
    "TrainingSetup",
    "analytic_param_count",
    "attention_implementation",
    "fake_profile",
    "load_model_config",
    "model_states",
    "parameter_count",
    "preset_names",
]

PRESETS_DIR = Path(__file__).resolve().parent / "presets"

#: Bytes per element of the training dtypes ``TrainingSetup.dtype`` accepts.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

#: fp32 optimizer states per trainable parameter.
OPTIMIZER_STATES = {"adamw": 2, "sgd-momentum": 1, "sgd": 0}

_FP32_BYTES = 4

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
        dtype (str, default "bf16"): parameter, gradient and activation dtype: ``bf16``, ``fp16`` or ``fp32``.
        optimizer (str, default "adamw"): ``adamw`` (2 fp32 states), ``sgd-momentum`` (1) or ``sgd`` (0).
        zero_stage (int, default 0): ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also
            parameters, each over ``world_size`` GPUs.
        world_size (int, default 1): data-parallel GPUs the states are sharded over.
    """

    seq_len: int
    batch_size: int = 1
    dtype: str = "bf16"
    optimizer: str = "adamw"
    zero_stage: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        for key in ("seq_len", "batch_size", "world_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {self.optimizer!r}")
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


def model_states(n_params: int, setup: TrainingSetup) -> ModelStates:
    """Count model states for ``n_params`` trainable parameters under ``setup``.

    Parameters and gradients are in ``setup.dtype``. The optimizer holds its fp32 states and, when the
    dtype is bf16 or fp16, an fp32 master copy of the parameters (mixed-precision training). ZeRO stage
    1 divides the optimizer bytes by the world size, stage 2 also the gradients, stage 3 also the
    parameters (rounded up: the last rank holds the remainder).

    Args:
        n_params (int): trainable parameters.
        setup (TrainingSetup): dtype, optimizer, ZeRO stage and world size.

    Example:
        >>> s = model_states(1000, TrainingSetup(seq_len=1))
        >>> (s.param_bytes, s.grad_bytes, s.optimizer_bytes)
        (2000, 2000, 12000)
    """
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 0:
        raise ValueError(f"n_params must be an int >= 0, got {n_params!r}")
    width = DTYPE_BYTES[setup.dtype]
    states = OPTIMIZER_STATES[setup.optimizer]
    master = setup.dtype != "fp32"
    per_param_opt = _FP32_BYTES * (states + (1 if master else 0))
    shards = setup.world_size

    def shard(nbytes: int, stage: int) -> int:
        return shard_bytes(nbytes, shards) if setup.zero_stage >= stage else nbytes

    parts = [f"{states} fp32 state{'s' if states != 1 else ''}"]
    if master:
        parts.append("fp32 master copy")
    convention = (f"params and grads in {setup.dtype} ({width} B/param each); {setup.optimizer}: "
                  f"{' + '.join(parts)} = {per_param_opt} B/param")
    if setup.zero_stage:
        sharded = ["optimizer", "gradients", "parameters"][: setup.zero_stage]
        convention += f"; ZeRO-{setup.zero_stage} shards {', '.join(sharded)} over {shards} GPUs"
    return ModelStates(n_params=n_params, param_bytes=shard(width * n_params, 3),
                       grad_bytes=shard(width * n_params, 2), optimizer_bytes=shard(per_param_opt * n_params, 1),
                       convention=convention)


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
        n_params = _trainable_params(module)
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
    states = model_states(n_params, setup)
    meta = dict(graph.meta)
    meta.update({
        "model": name, "architecture": type(module).__name__, "model_type": hf_config.model_type,
        "attn_implementation": attention,
        "profiled": "fake", "timing": f"roofline of {hardware.name}", "n_params": n_params,
        "seq_len": setup.seq_len, "batch_size": setup.batch_size, "dtype": setup.dtype,
        "optimizer": setup.optimizer, "zero_stage": setup.zero_stage, "world_size": setup.world_size,
        "model_states_convention": states.convention, "trace_s": time.perf_counter() - started,
        "modelled_flops": roofline.flops, "modelled_step_s_safe_mode": roofline.elapsed_s,
    })
    limit_note = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(limit_note, int) and setup.seq_len > limit_note:
        meta["note"] = f"seq {setup.seq_len} exceeds the model's max_position_embeddings ({limit_note})"
    gathered = zero3_gathered(graph, n_params, setup.dtype, setup.world_size) if setup.zero_stage == 3 else 0
    # Plans copy the graph's meta: this lets Plan.summary split a budget into states and activations.
    return dataclasses.replace(
        graph, param_bytes=states.param_bytes, grad_bytes=states.grad_bytes, optimizer_bytes=states.optimizer_bytes,
        sharding_degree=setup.world_size if setup.zero_stage else 1, gathered_param_bytes=gathered, meta=meta)


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

