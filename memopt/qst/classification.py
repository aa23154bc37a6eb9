"""``QSTForSequenceClassification``: QST on a Hugging Face sequence classifier, as the paper's GLUE runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backbone import HeadKind
from .config import QSTConfig
from .model import QSTModel

__all__ = ["QSTForSequenceClassification"]


class QSTForSequenceClassification(QSTModel):
    """A Hugging Face ``*ForSequenceClassification`` model tuned by QST; ``apply_qst`` builds it.

    The backbone is frozen and quantized as for a causal LM. Its classifier head (``score``, new and
    randomly initialised) reads the backbone's last hidden state with the side network's correction
    added, and trains with the side network; the two are all that ``state_dict`` and
    ``save_pretrained`` hold. Pooling (the last non-padding token) and the loss (regression, single- or
    multi-label, by ``config.problem_type``) are the wrapped model's own.

    Args:
        model (nn.Module): e.g. ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)``
            of a supported family; set ``model.config.pad_token_id`` for batches with padding.
        config (QSTConfig): the QST options.

    Example:
        >>> from memopt.qst import QSTConfig, apply_qst
        >>> from memopt.qst.testing import tiny_classifier
        >>> qst = apply_qst(tiny_classifier("llama", num_labels=3), QSTConfig(r=4, quantize=None))
        >>> type(qst).__name__, sorted({key.split(".")[0] for key in qst.state_dict()})
        ('QSTForSequenceClassification', ['score', 'side'])
    """

    _head_kind = HeadKind.CLASSIFIER
    # The Trainer must average the loss over gradient accumulation itself: the classifier's loss takes
    # no token count.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, config: QSTConfig):
        super().__init__(model, config)
        self.score = self._info.head
        self.score.requires_grad_(True)

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"side": self.side, "score": self.score}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Pooled class logits (and the loss when ``labels`` are given), like the wrapped model's forward.

        Args:
            input_ids (torch.Tensor | None): (batch, tokens) token ids.
            attention_mask (torch.Tensor | None): (batch, tokens), 1 for real tokens, 0 for padding.
            labels (torch.Tensor | None): (batch,) class indices, or floats for regression.
            inputs_embeds (torch.Tensor | None): instead of ``input_ids``.
            **kwargs: further backbone keyword arguments (``use_cache`` and ``return_dict`` are ignored).

        Returns:
            transformers.modeling_outputs.SequenceClassifierOutputWithPast: ``loss`` and ``logits``
            (batch, num_labels).
        """
        for ignored in ("use_cache", "return_dict", "num_items_in_batch"):
            kwargs.pop(ignored, None)
        # The backbone runs with grad enabled so that the head and the loss after it record a graph;
        # nothing before the side network requires grad, so autograd keeps nothing of the backbone.
        with self._side_mixed_into_head(None):
            return self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                use_cache=False, **kwargs,
            )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Not available: a sequence classifier does not generate.

        Raises:
            TypeError: always.
        """
        raise TypeError(
            "QSTForSequenceClassification classifies; it has no LM head to generate with. Call it on a batch "
            "for class logits, or wrap an AutoModelForCausalLM with apply_qst to generate"
        )
