"""``apply_qst`` and ``QSTModel``: a frozen NF4 backbone with a trainable side network beside it."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import Backbone, HeadKind, HiddenCapture, count_parameters, describe, quantize_nf4
from .config import QSTConfig
from .layers import SideCache
from .side import SideNetwork

__all__ = ["QSTModel", "apply_qst"]

CONFIG_NAME = "qst_config.json"
WEIGHTS_NAME = "side_model.safetensors"
# 2: gated per channel, zero-started upsample, downsample norms; keys carry their module prefix.
_FORMAT_VERSION = 2
# Target modules of LoRA inside the side layers: every linear of a SideBlock.
_SIDE_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


class QSTModel(nn.Module):
    """A Hugging Face causal LM tuned by Quantized Side Tuning; build it with ``apply_qst``.

    The backbone (``self.backbone``, the wrapped model, modified in place) is frozen, NF4-quantized
    unless ``quantize=None``, and runs under ``torch.no_grad``: nothing it computes is kept for
    backward. The side network (``self.side``) reads the backbone's hidden states and is the only part
    that trains and the only part ``save_pretrained`` writes. The LM head stays frozen; gradients flow
    through it into the side network only.

    The side network computes in the backbone's compute dtype unless ``QSTConfig.side_dtype`` says
    otherwise (norms and gates in float32) and sits on the head's device: hidden states of layers placed
    elsewhere (``device_map``) are moved to it. ``generate`` keeps a key/value cache for the side
    network beside the backbone's.

    Args:
        model (nn.Module): a Hugging Face causal LM of a supported family (see
            ``memopt.qst.backbone.ARCHITECTURES``).
        config (QSTConfig): the QST options.

    Raises:
        ValueError: unsupported architecture, a model that is already a ``QSTModel``, ``r`` not dividing
            the hidden size, or a layer index out of range. The model is left untouched.
        ImportError: ``quantize="nf4"`` without bitsandbytes, or ``side_lora_rank`` without peft.
    """

    _head_kind = HeadKind.LM

    def __init__(self, model: nn.Module, config: QSTConfig):
        super().__init__()
        if not isinstance(config, QSTConfig):
            raise TypeError(f"config must be a QSTConfig, got {type(config).__name__}; e.g. QSTConfig(r=16)")
        if isinstance(model, QSTModel):
            raise ValueError(
                f"model is already a QSTModel (r={model.qst_config.r}, wrapping {type(model.backbone).__name__}); "
                "train it as it is, or pass the original Hugging Face causal LM to apply_qst. apply_qst "
                "quantizes and freezes that model in place, so to start over with another config load it afresh"
            )
        info = describe(model)
        _check_head_kind(type(self), info)
        num_layers = len(info.layers)
        fed = list(range(num_layers)) if config.layers is None else list(config.layers)
        if fed[-1] >= num_layers:
            raise ValueError(
                f"layers={config.layers!r} names layer {fed[-1]}, but the backbone has {num_layers} layers "
                f"(0..{num_layers - 1}); pass indices in that range or None for all"
            )
        config.side_width(info.hidden_size)  # raises before the model is touched
        if config.side_lora_rank is not None:
            _import_peft()
        compute_dtype = getattr(torch, config.compute_dtype) if config.compute_dtype else _floating_dtype(model)
        if config.quantize == "nf4":
            quantize_nf4(model, double_quant=config.double_quant, compute_dtype=compute_dtype, keep=info.head)
        model.requires_grad_(False)

        # The side network sits with the head: hidden states from layers on other devices (device_map)
        # are moved to it, and its output is where the head reads it.
        with torch.device(info.head.weight.device):
            side = SideNetwork(
                config, hidden_size=info.hidden_size, out_features=info.out_features, num_fed=len(fed),
                backbone_heads=info.heads, intermediate_size=info.intermediate_size,
                dtype=getattr(torch, config.side_dtype) if config.side_dtype else compute_dtype,
            )
        if config.side_lora_rank is not None:
            _add_side_lora(side, config)
        self.backbone = model
        self.side = side
        self.qst_config = config
        self._info = info
        self._capture = HiddenCapture(info.layers, fed)

    # -- Hugging Face look-alike attributes ----------------------------------------------------------

    @property
    def config(self) -> Any:
        """The backbone's Hugging Face config."""
        return self.backbone.config

    @property
    def generation_config(self) -> Any:
        """The backbone's generation config."""
        return getattr(self.backbone, "generation_config", None)

    @property
    def device(self) -> torch.device:
        """Device of the side network (and of the head)."""
        return self.side.device

    def get_input_embeddings(self) -> nn.Module:
        """The backbone's input embeddings."""
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        """The backbone's (frozen) LM head."""
        return self.backbone.get_output_embeddings()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameters; a 4-bit weight counts as the elements it stands for."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, as peft does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- forward and generation ----------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Logits (and the causal-LM loss when ``labels`` are given), like the wrapped model's forward.

        Args:
            input_ids (torch.Tensor | None): (batch, tokens) token ids.
            attention_mask (torch.Tensor | None): (batch, tokens), 1 for real tokens, 0 for padding.
            labels (torch.Tensor | None): (batch, tokens) targets, -100 where ignored; shifted inside,
                as Hugging Face does.
            position_ids (torch.Tensor | None): passed to the backbone.
            inputs_embeds (torch.Tensor | None): instead of ``input_ids``.
            num_items_in_batch (int | torch.Tensor | None): token count the Trainer normalises the loss
                by under gradient accumulation.
            **kwargs: further backbone keyword arguments (``use_cache`` and ``return_dict`` are ignored).

        Returns:
            transformers.modeling_outputs.CausalLMOutputWithPast: ``loss`` (or None) and ``logits``.
        """
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        with self._capture() as capture:
            with torch.no_grad():
                trunk = self.backbone.base_model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    inputs_embeds=inputs_embeds, use_cache=False, return_dict=True, **kwargs,
                )
            states = capture.collected()
        hidden = self.side(states, trunk.last_hidden_state, attention_mask)
        logits = self.backbone.get_output_embeddings()(hidden)
        loss = None
        if labels is not None:
            loss = self.backbone.loss_function(
                logits=logits, labels=labels, vocab_size=self.backbone.config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the wrapped model, with the side network mixed in before the LM head.

        Takes the same arguments as ``transformers.GenerationMixin.generate``. With ``use_cache`` (the
        default) the backbone keeps its key/value cache and the side network keeps its own beside it,
        so each token passes through both once. Modes that rewind or reorder a cache (beam search,
        assisted decoding) run without either cache: exact, slower.
        """
        cache = SideCache() if self._cache_applies(kwargs) else None
        kwargs["use_cache"] = cache is not None
        with self._side_mixed_into_head(cache):
            return self.backbone.generate(*args, **kwargs)

    def _cache_applies(self, kwargs: dict[str, Any]) -> bool:
        """Whether ``generate`` only ever appends to its cache (greedy search or sampling)."""
        config = kwargs.get("generation_config") or self.generation_config

        def setting(name: str, default: Any) -> Any:
            value = kwargs.get(name, getattr(config, name, None))
            return default if value is None else value

        assisted = kwargs.get("assistant_model") is not None or any(
            setting(name, None) is not None for name in ("prompt_lookup_num_tokens", "assistant_early_exit")
        )
        return bool(setting("use_cache", True)) and setting("num_beams", 1) == 1 and not assisted

    @contextlib.contextmanager
    def _side_mixed_into_head(self, cache: SideCache | None) -> Iterator[None]:
        """Within: every backbone forward mixes the side network into the head's input."""
        seen: dict[str, torch.Tensor | None] = {}

        def remember_mask(_module: nn.Module, _args: tuple, call_kwargs: dict) -> None:
            seen["attention_mask"] = call_kwargs.get("attention_mask")

        def mix_side(_module: nn.Module, head_args: tuple) -> tuple:
            mixed = self.side(capture.collected(), head_args[0], seen.get("attention_mask"), cache)
            return (mixed, *head_args[1:])

        handles = [
            self.backbone.register_forward_pre_hook(remember_mask, with_kwargs=True),
            self._info.head.register_forward_pre_hook(mix_side),
        ]
        try:
            with self._capture() as capture:
                yield
        finally:
            for handle in handles:
                handle.remove()

    # -- saving and loading --------------------------------------------------------------------------

    def _trained_modules(self) -> dict[str, nn.Module]:
        """What trains, and so what is saved, by state-dict prefix."""
        return {"side": self.side}

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The side network's state only (and a classifier's head), under ``side.``-prefixed keys.

        The backbone is borrowed, frozen and reloaded from its own checkpoint, so it is no part of what
        a QST run produces; keeping it out also lets the Hugging Face Trainer checkpoint and resume a
        QSTModel (a whole 4-bit backbone with tied embeddings cannot be written as safetensors).
        """
        if args:
            raise TypeError("QSTModel.state_dict takes keyword arguments only (destination, prefix, keep_vars)")
        for name, module in self._trained_modules().items():
            destination = module.state_dict(destination=destination, prefix=f"{prefix}{name}.", keep_vars=keep_vars)
        return destination

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load what ``state_dict`` returned; keys of the backbone are reported as unexpected.

        Raises:
            RuntimeError: with ``strict=True``, a key is missing or unexpected.
        """
        modules = self._trained_modules()
        foreign = [k for k in state_dict if k.split(".", 1)[0] not in modules]
        if strict and foreign:
            raise RuntimeError(
                f"unexpected keys {foreign[:5]} in QSTModel.load_state_dict: only {sorted(modules)} "
                f"({', '.join(repr(m + '.*') for m in sorted(modules))}) are loaded; load backbone weights into the "
                "backbone before apply_qst"
            )
        missing: list[str] = []
        unexpected: list[str] = list(foreign)
        for name, module in modules.items():
            part = {k.removeprefix(name + "."): v for k, v in state_dict.items() if k.startswith(name + ".")}
            result = module.load_state_dict(part, strict=strict, assign=assign)
            missing += [f"{name}.{k}" for k in result.missing_keys]
            unexpected += [f"{name}.{k}" for k in result.unexpected_keys]
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write what trained (``side_model.safetensors``: the side network, and a classifier's head) and
        its config (``qst_config.json``); nothing of the backbone.

        Args:
            save_directory (str | os.PathLike): created when missing.
        """
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT_VERSION,
            "model_type": self._info.model_type,
            "hidden_size": self._info.hidden_size,
            "num_hidden_layers": len(self._info.layers),
            **_head_facts(self._info),
            "qst_config": self.qst_config.to_dict(),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, pretrained_path: str | os.PathLike, *, is_trainable: bool = False
    ) -> QSTModel:
        """Wrap ``model`` as ``save_pretrained`` recorded and load the saved side network into it.

        Args:
            model (nn.Module): the same backbone the side network was trained on (unquantized, or
                already 4-bit; for a classifier, the ``AutoModelForSequenceClassification`` with the same
                ``num_labels``).
            pretrained_path (str | os.PathLike): a directory written by ``save_pretrained``.
            is_trainable (bool, default False): keep the side network trainable (to continue training);
                False freezes it for inference, as peft does.

        Returns:
            QSTModel: a ``QSTForSequenceClassification`` when ``model`` is a sequence classifier.

        Raises:
            FileNotFoundError: the directory lacks the config or weights file.
            ValueError: the saved side network was made for another backbone shape or family, or by a memopt
                whose side network differs.
        """
        from safetensors.torch import load_file

        directory = Path(pretrained_path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found; write it with QSTModel.save_pretrained")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(
                f"{directory} holds QST format {meta.get('format')!r}; this memopt reads {_FORMAT_VERSION}. Its side "
                "network is built differently (format 1 had no downsample norms and a scalar output mix): "
                "train it again with this memopt"
            )
        info = describe(model)
        found = {"model_type": info.model_type, "hidden_size": info.hidden_size, "num_hidden_layers": len(info.layers),
                 **_head_facts(info)}
        expected = {k: meta.get(k) for k in found}
        if found != expected:
            raise ValueError(
                f"the side network in {directory} was trained on a backbone with {expected}, but this model has "
                f"{found}; load it onto the backbone it was trained with"
            )
        qst = apply_qst(model, QSTConfig.from_dict(meta["qst_config"]))
        qst.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(qst.device)))
        if not is_trainable:
            qst.requires_grad_(False)
        return qst


def _head_facts(info: Backbone) -> dict[str, Any]:
    """What a saved side network must match besides the backbone's shape: its head."""
    facts: dict[str, Any] = {"head": info.head_kind.value}
    if info.head_kind is HeadKind.CLASSIFIER:
        facts["num_labels"] = int(info.head.weight.shape[0])
    return facts


def _check_head_kind(cls: type, info: Backbone) -> None:
    if info.head_kind is cls._head_kind:
        return
    if info.head_kind is HeadKind.CLASSIFIER:
        raise ValueError(
            f"{info.model_type!r} model with a classifier head ('score'): wrap it with apply_qst or "
            f"QSTForSequenceClassification, not {cls.__name__}"
        )
    raise ValueError(
        f"{cls.__name__} needs a sequence classifier (AutoModelForSequenceClassification), got a causal LM; wrap "
        "that with apply_qst or QSTModel"
    )


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            "QSTConfig(side_lora_rank=...) needs peft: pip install 'memopt[hf]', or pass side_lora_rank=None"
        ) from exc
    return peft


def _add_side_lora(side: SideNetwork, config: QSTConfig) -> None:
    peft = _import_peft()
    lora = peft.LoraConfig(
        r=config.side_lora_rank, lora_alpha=config.side_lora_alpha, lora_dropout=0.0, target_modules=_SIDE_LINEARS,
    )
    peft.inject_adapter_in_model(lora, side.blocks)
    for name, param in side.blocks.named_parameters():
        # peft marks only its adapters trainable; the blocks' norms stay trainable as cheap full params.
        param.requires_grad_("lora_" in name or "norm" in name)


def apply_qst(model: nn.Module, config: QSTConfig | None = None) -> QSTModel:
    """Quantize and freeze ``model`` in place and attach a trainable side network to it.

    Args:
        model (nn.Module): a Hugging Face causal LM (Llama, Mistral, Qwen2, GPT-2 or OPT family), or a
            sequence classifier of these families, unquantized or loaded in 4-bit already.
        config (QSTConfig | None, default None): QST options; None takes the defaults (r=16, adapter
            downsample, NF4 with double quantization).

    Returns:
        QSTModel: the wrapped model; only ``qst.side`` requires grad. For a sequence classifier a
        ``QSTForSequenceClassification``, whose new head trains too.

    Raises:
        ValueError: unsupported architecture, a model that is already a ``QSTModel``, or a config that does
            not fit the model.
        ImportError: a needed optional dependency is missing (the message says what to install).

    Example:
        >>> from memopt.qst import QSTConfig, apply_qst
        >>> from memopt.qst.testing import tiny_causal_lm
        >>> qst = apply_qst(tiny_causal_lm("llama"), QSTConfig(r=4, quantize=None))
        >>> all(not p.requires_grad for p in qst.backbone.parameters())
        True
    """
    config = config if config is not None else QSTConfig()
    if not isinstance(model, QSTModel) and describe(model).head_kind is HeadKind.CLASSIFIER:
        from .classification import QSTForSequenceClassification

        return QSTForSequenceClassification(model, config)
    return QSTModel(model, config)
