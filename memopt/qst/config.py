"""``QSTConfig``: every option of Quantized Side Tuning in one validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["QSTConfig"]

DOWNSAMPLES = ("adapter", "avgpool", "linear", "maxpool")
QUANTIZATIONS = ("nf4", None)
DTYPES = ("bfloat16", "float16", "float32", None)


def _positive_int(value: Any, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}; {hint}")


@dataclass
class QSTConfig:
    """How ``apply_qst`` builds the side network beside a frozen, quantized backbone.

    Args:
        r (int, default 16): reduction factor; side layers are ``hidden_size / r`` wide. Must divide the
            backbone's hidden size (checked when the config meets a model).
        downsample (str, default "adapter"): how each backbone hidden state is narrowed to the side
            width. ``"adapter"``: d -> ``adapter_rank`` -> d/r, two small linears. ``"linear"``: one
            d -> d/r linear. ``"maxpool"`` / ``"avgpool"``: parameter-free pooling over groups of ``r``
            channels; nothing of width d is kept for backward.
        adapter_rank (int, default 16): bottleneck width of the ``"adapter"`` downsample.
        downsample_norm (bool, default True): end every downsample in a LayerNorm (computed in float32),
            as the authors' adapter does. Backbone hidden states differ in scale from layer to layer and
            carry outlier channels; without the norm a pooled downsample hands them on unscaled.
        quantize (str | None, default "nf4"): ``"nf4"`` replaces every backbone linear (the LM head
            excepted) with a bitsandbytes NF4 ``Linear4bit``; None leaves the backbone's weights as they
            are (useful for tests and for backbones already quantized at load time).
        double_quant (bool, default True): also quantize the NF4 block scales (bitsandbytes
            ``compress_statistics``), about 0.4 bits a parameter less.
        compute_dtype (str | None, default None): dtype the 4-bit matmuls run in (``"bfloat16"``,
            ``"float16"``, ``"float32"``); None uses the backbone's own floating dtype.
        side_dtype (str | None, default None): dtype of the side network's weights and activations; None
            takes the backbone's compute dtype (``compute_dtype``, else the backbone's floating dtype), so a
            bfloat16 backbone gets a bfloat16 side network and no float32 copy of its hidden states. Norms
            and mixing gates stay float32 whatever this is: their updates are finer than bfloat16
            resolves. ``"float32"`` trains every other weight in float32 too (more memory, exact updates).
        layers (list[int] | None, default None): indices of the backbone's decoder layers whose outputs
            feed the side network, one side layer each; None feeds every layer.
        side_lora_rank (int | None, default None): when set, the side layers' linears are frozen after
            their random initialisation and train through peft LoRA adapters of this rank instead;
            gates, downsamples and the upsample still train in full.
        side_lora_alpha (float, default 16.0): LoRA scaling numerator (``lora_alpha``) of those adapters.

    Raises:
        ValueError: an option is out of range; the message quotes it and names a valid choice.

    Example:
        >>> QSTConfig(r=8, downsample="maxpool").side_width(4096)
        512
    """

    r: int = 16
    downsample: str = "adapter"
    adapter_rank: int = 16
    quantize: str | None = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    side_dtype: str | None = None
    downsample_norm: bool = True
    layers: list[int] | None = None
    side_lora_rank: int | None = None
    side_lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        _positive_int(self.r, "r", "the default 16 makes side layers 16 times narrower than the backbone")
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {self.downsample!r}")
        _positive_int(self.adapter_rank, "adapter_rank", "e.g. 16")
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(
                f"quantize must be 'nf4' or None, got {self.quantize!r}; pass None to keep the backbone's weights"
            )
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {self.double_quant!r}")
        self.compute_dtype = _dtype_name(self.compute_dtype, "compute_dtype")
        self.side_dtype = _dtype_name(self.side_dtype, "side_dtype")
        if not isinstance(self.downsample_norm, bool):
            raise ValueError(
                f"downsample_norm must be True or False, got {self.downsample_norm!r}; True (the default) ends "
                "each downsample in a LayerNorm"
            )
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"layers must be a list of layer indices, got {self.layers!r}; e.g. [0, 2, 4]")
            layers = list(self.layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(
                    f"layers must be a non-empty list of non-negative layer indices, got {self.layers!r}; "
                    "pass None to feed every layer"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers lists an index twice: {self.layers!r}; list each layer once")
            self.layers = sorted(layers)
        if self.side_lora_rank is not None:
            _positive_int(self.side_lora_rank, "side_lora_rank", "e.g. 8, or None to train the side layers in full")
        if isinstance(self.side_lora_alpha, bool) or not isinstance(self.side_lora_alpha, (int, float)) \
                or not self.side_lora_alpha > 0:
            raise ValueError(f"side_lora_alpha must be a positive number, got {self.side_lora_alpha!r}; e.g. 16")
        self.side_lora_alpha = float(self.side_lora_alpha)

    def side_width(self, hidden_size: int) -> int:
        """Width of the side layers for a backbone of ``hidden_size`` channels.

        Raises:
            ValueError: ``r`` does not divide ``hidden_size``.
        """
        if hidden_size % self.r:
            divisors = [d for d in (2, 4, 8, 16, 32, 64) if hidden_size % d == 0]
            raise ValueError(
                f"r={self.r} does not divide the backbone's hidden size {hidden_size}; "
                f"pick r among its divisors, e.g. {divisors or [1]}"
            )
        return hidden_size // self.r

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; ``QSTConfig.from_dict`` reverses it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QSTConfig:
        """Build from ``to_dict`` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QSTConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _dtype_name(value: Any, field: str) -> str | None:
    """Accept a ``torch.dtype`` or its name; store the name so the config stays JSON-ready."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(
            f"{field} must be one of {DTYPES} or the matching torch.dtype, got {value!r}; None follows the backbone"
        )
    return name
