"""Quantized Side Tuning: fine-tune a frozen 4-bit causal LM through a narrow side network.

``qst = apply_qst(model, QSTConfig())`` quantizes the model's linears to NF4, freezes them, and attaches a
side network ``r`` times narrower that reads every layer's hidden state. No gradient flows through the
backbone, so none of its activations are kept for backward. ``qst`` trains like the Hugging Face model it
wraps (``forward`` with ``labels``, the Trainer, ``generate``) and ``qst.save_pretrained`` stores the side
network alone. A Hugging Face sequence classifier gets a ``QSTForSequenceClassification``, whose new head
trains with the side network.

Importing this package needs only torch; transformers, peft and bitsandbytes are imported when used.
"""

from __future__ import annotations

from .classification import QSTForSequenceClassification
from .config import QSTConfig
from .model import QSTModel, apply_qst

__all__ = ["QSTConfig", "QSTForSequenceClassification", "QSTModel", "apply_qst"]
