"""What QST needs to know about, and do to, a Hugging Face causal LM: its layers, NF4 quantization,
freezing, and hooks that capture the hidden states the side network reads."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES", "Backbone", "HeadKind", "HiddenCapture", "count_parameters", "describe",
    "non_activation_storages", "quantize_nf4",
]

# model_type -> path of the decoder layers' ModuleList. Only families whose forward is
# ``lm_head(base_model(...).last_hidden_state)`` with no logit scaling or soft-capping belong here;
# anything else would make the side network's output disagree with the backbone's logits.
ARCHITECTURES = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "mistral": "model.layers",
    "opt": "model.decoder.layers",
    "qwen2": "model.layers",
}

_HF_HINT = "pip install 'memopt[hf]'"


class HeadKind(enum.Enum):
    """What reads the backbone's last hidden state: a frozen LM head, or a new (trainable) classifier."""

    LM = "lm"
    CLASSIFIER = "classifier"


@dataclass
class Backbone:
    """Facts about a supported backbone.

    Args:
        model_type (str): the Hugging Face ``config.model_type``.
        layers (nn.ModuleList): its decoder layers, in order.
        hidden_size (int): width of the decoder layers' hidden states.
        out_features (int): width of the head's input.
        heads (int): attention heads per layer.
        intermediate_size (int): MLP inner width.
        head (nn.Module): the LM head (``lm_head``) or the classifier (``score``).
        head_kind (HeadKind): which of the two ``head`` is.
    """

    model_type: str
    layers: nn.ModuleList
    hidden_size: int
    out_features: int
    heads: int
    intermediate_size: int
    head: nn.Module
    head_kind: HeadKind


def _head(model: nn.Module) -> tuple[nn.Module | None, HeadKind]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head, HeadKind.LM
    score = getattr(model, "score", None)
    if isinstance(score, nn.Linear) and type(model).__name__.endswith("ForSequenceClassification"):
        return score, HeadKind.CLASSIFIER
    return None, HeadKind.LM


def describe(model: nn.Module) -> Backbone:
    """Check that ``model`` is a supported causal LM or sequence classifier and read off its shape.

    Raises:
        ValueError: the model is not a Hugging Face causal LM or sequence classifier of a supported family.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = sorted(ARCHITECTURES)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"QST supports Hugging Face causal LMs of the families {supported}; got {type(model).__name__} "
            f"(model_type={model_type!r}). Load one of these with AutoModelForCausalLM (or "
            "AutoModelForSequenceClassification)"
        )
    head, head_kind = _head(model)
    if head is None or not hasattr(model, "base_model"):
        raise ValueError(
            f"{type(model).__name__} has no LM head; QST needs the causal LM class, "
            f"e.g. AutoModelForCausalLM.from_config(config), not the bare {model_type!r} model "
            "(or AutoModelForSequenceClassification for a classifier)"
        )
    layers = model.get_submodule(ARCHITECTURES[model_type])
    hidden_size = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    intermediate = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "ffn_dim", None)
        or getattr(config, "n_inner", None)
        or 4 * hidden_size
    )
    return Backbone(
        model_type, layers, hidden_size, int(head.weight.shape[-1]), heads, int(intermediate), head, head_kind
    )


def _import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(
            f"QSTConfig(quantize='nf4') needs bitsandbytes: {_HF_HINT}, or pass quantize=None to keep the "
            "backbone unquantized"
        ) from exc
    return bnb


def quantize_nf4(
    model: nn.Module, *, double_quant: bool, compute_dtype: torch.dtype, keep: nn.Module | None = None
) -> int:
    """Replace every linear of ``model`` except its head with a bitsandbytes NF4 ``Linear4bit``, in place.

    GPT-2's ``Conv1D`` (a linear with a transposed weight) is converted too. Linears already 4-bit are
    left alone. On the meta device the weights stay unquantized ``Params4bit`` of the original shape
    (there is no data to quantize), which is what parameter counting needs.

    Args:
        model (nn.Module): the causal LM.
        double_quant (bool): quantize the block scales too.
        compute_dtype (torch.dtype): dtype of the 4-bit matmuls.
        keep (nn.Module | None, default None): the head to leave unquantized; None means the model's
            output embeddings (its LM head).

    Returns:
        int: how many layers were replaced.

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    bnb = _import_bnb()
    from transformers.pytorch_utils import Conv1D

    head = keep if keep is not None else model.get_output_embeddings()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head or isinstance(child, bnb.nn.Linear4bit):
                continue
            if isinstance(child, nn.Linear):
                weight = child.weight.detach()
            elif isinstance(child, Conv1D):
                weight = child.weight.detach().t()  # Conv1D stores (in, out); Linear4bit wants (out, in)
            else:
                continue
            out_features, in_features = weight.shape
            device = weight.device
            layer = bnb.nn.Linear4bit(
                in_features, out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=double_quant, quant_type="nf4", device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                weight.contiguous(), requires_grad=False, compress_statistics=double_quant,
                quant_type="nf4", module=layer,
            )
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            # Params4bit quantizes when moved to a real device; on meta it stays as it is.
            layer.to(device)
            setattr(parent, name, layer)
            replaced += 1
    return replaced


def _unquantized_numel(param: torch.Tensor) -> int:
    state = getattr(param, "quant_state", None)
    if getattr(param, "bnb_quantized", False) and state is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a 4-bit weight counts as the elements it stands for."""
    trainable = total = 0
    for param in module.parameters():
        n = _unquantized_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def non_activation_storages(module: nn.Module) -> set[int]:
    """Data pointers of parameters, buffers and 4-bit quantization state: never counted as activations."""
    pointers = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        pointers.add(tensor.untyped_storage().data_ptr())
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            for value in vars(state).values():
                if isinstance(value, torch.Tensor):
                    pointers.add(value.untyped_storage().data_ptr())
            state = getattr(state, "state2", None)
    return pointers


class HiddenCapture:
    """Collects ``h_0`` (the first layer's input) and the outputs of the fed layers during a forward."""

    def __init__(self, layers: nn.ModuleList, fed: list[int]):
        self.layers = layers
        self.fed = fed
        self.states: list[torch.Tensor | None] = []

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @contextlib.contextmanager
    def __call__(self) -> Iterator[HiddenCapture]:
        self.states = [None] * (len(self.fed) + 1)

        def first_input(_module, args, kwargs):
            self.states[0] = self._hidden(args, kwargs)

        def output_of(slot: int):
            def hook(_module, _args, output):
                self.states[slot] = output[0] if isinstance(output, (tuple, list)) else output
            return hook

        handles = [self.layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
        handles += [self.layers[i].register_forward_hook(output_of(k + 1)) for k, i in enumerate(self.fed)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            # Dropping the references here lets the states die with the step that used them.
            self.states = []

    def collected(self) -> list[torch.Tensor]:
        """The captured states, ``h_0`` first; raises if a hook did not fire."""
        missing = [i for i, s in enumerate(self.states) if s is None]
        if not self.states:
            raise RuntimeError("hidden states are only collected inside an active capture")
        if missing:
            raise RuntimeError(f"backbone forward did not reach hidden-state slots {missing}; was it run?")
        return list(self.states)
