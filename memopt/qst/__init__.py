"""Quantized Side Tuning: fine-tune a frozen 4-bit causal LM through a narrow side network.

``qst = apply_qst(model, QSTConfig())`` quantizes the model's linears to NF4, freezes them, and attaches a
side network ``r`` times narrower that reads every layer's hidden state. No gradient flows through the
backbone, so none of its activations are kept for backward. ``qst`` trains like the Hugging Face model it
wraps (``forward`` with ``labels``, the Trainer, ``generate``) and ``qst.save_pretrained`` stores the side
network alone.

Importing this package needs only torch; transformers, peft and bitsandbytes are imported when used.
"""

from __future__ import annotations

from .config import QSTConfig
from .model import QSTModel, apply_qst

__all__ = ["QSTConfig", "QSTModel", "apply_qst"]
