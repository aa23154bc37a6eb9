"""QSTForSequenceClassification: built from a Hugging Face sequence classifier, starts at the backbone's
logits, trains on a tiny task, and saves and loads only what trained (side network and head)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from memopt.qst import QSTConfig, QSTForSequenceClassification, QSTModel, apply_qst  # noqa: E402
from memopt.qst.testing import FAMILIES, tiny_causal_lm, tiny_classifier, wake_side  # noqa: E402

VOCAB = 32


def _task(generator: torch.Generator, batch: int = 32) -> dict:
    """Right-padded rows of 4-8 tokens; the class is whether the first token is in the upper half.

    The head reads the last real token, so the side network must carry the first token to it.
    """
    ids = torch.randint(2, VOCAB, (batch, 8), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(torch.randint(4, 9, (batch,), generator=generator).tolist()):
        ids[row, length:] = 1
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] >= 17).long()}


def _accuracy(qst: QSTModel, batch: dict) -> float:
    with torch.no_grad():
        return (qst(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_is_frozen_4bit_but_its_head_and_starts_at_the_backbones_logits(family):
    model = tiny_classifier(family, num_labels=3)
    batch = _task(torch.Generator().manual_seed(0), batch=4)
    batch.pop("labels")
    with torch.no_grad():
        qst = apply_qst(model, QSTConfig(r=4))
        expected = qst.backbone(**batch).logits
        got = qst(**batch).logits
    assert isinstance(qst, QSTForSequenceClassification) and got.shape == (4, 3)
    assert torch.equal(got, expected)
    assert not isinstance(qst.score, bnb.nn.Linear4bit) and qst.score is qst.backbone.score
    trainable = {id(p) for p in qst.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in [*qst.side.parameters(), *qst.score.parameters()]}
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in qst.backbone.modules()) > 0


def test_classifier_trains_on_a_tiny_task():
    torch.manual_seed(0)
    qst = apply_qst(tiny_classifier("llama", vocab_size=VOCAB), QSTConfig(r=4)).train()
    optimizer = torch.optim.AdamW([p for p in qst.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    held_out = _task(torch.Generator().manual_seed(99), batch=256)
    before = _accuracy(qst, held_out)
    for _ in range(100):
        loss = qst(**_task(generator)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(qst.parameters(), 1.0)
        optimizer.step()
    after = _accuracy(qst, held_out)
    # Seed 0 reaches 0.93 in 100 steps; chance is 0.5.
    assert before < 0.7 and after > 0.85, (before, after)


def test_classifier_backbone_keeps_nothing_for_backward():
    """The backbone runs with grad enabled (the head after it needs a graph) but records nothing: what
    autograd saves is no more than the causal-LM QST saves on the same backbone with the explicit
    no_grad path."""
    from torch.autograd.graph import saved_tensors_hooks

    def saved_bytes(qst: QSTModel, **batch) -> int:
        params = {p.untyped_storage().data_ptr() for p in qst.parameters()}
        held: dict[int, int] = {}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in params:
                held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with saved_tensors_hooks(pack, lambda t: t):
            qst(**batch).loss.backward()
        return sum(held.values())

    shape = {"num_layers": 4, "vocab_size": 256}
    ids = torch.randint(2, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    config = QSTConfig(r=4, downsample="avgpool")
    classifier = apply_qst(tiny_classifier("llama", **shape), config)
    causal = apply_qst(tiny_causal_lm("llama", **shape), config)
    for qst in (classifier, causal):
        wake_side(qst)
    held_classifier = saved_bytes(classifier, input_ids=ids, labels=torch.zeros(4, dtype=torch.long))
    held_causal = saved_bytes(causal, input_ids=ids, labels=ids)
    assert 0 < held_classifier <= held_causal


def test_save_and_load_hold_the_side_network_and_head_only(tmp_path):
    qst = apply_qst(tiny_classifier("qwen2", num_labels=3), QSTConfig(r=4))
    wake_side(qst)
    with torch.no_grad():
        qst.score.weight.normal_()
    batch = _task(torch.Generator().manual_seed(0), batch=4)
    batch.pop("labels")
    with torch.no_grad():
        expected = qst(**batch).logits
    state = qst.state_dict()
    assert {k.split(".")[0] for k in state} == {"side", "score"}
    assert set(state) - {"score.weight"} == {"side." + k for k in qst.side.state_dict()}
    qst.save_pretrained(tmp_path)
    side_bytes = (tmp_path / "side_model.safetensors").stat().st_size
    trained_numel = sum(p.numel() for p in qst.parameters() if p.requires_grad)
    assert side_bytes < 4 * trained_numel + 4096  # float32 side and head plus the header: no backbone

    loaded = QSTModel.from_pretrained(tiny_classifier("qwen2", num_labels=3), tmp_path)
    assert isinstance(loaded, QSTForSequenceClassification)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    with pytest.raises(ValueError, match=r"'num_labels': 3.*this model has .*'num_labels': 2"):
        QSTModel.from_pretrained(tiny_classifier("qwen2", num_labels=2), tmp_path)
    with pytest.raises(ValueError, match=r"'head': 'classifier'.*this model has .*'head': 'lm'"):
        QSTModel.from_pretrained(tiny_causal_lm("qwen2"), tmp_path)


def test_classifier_errors_say_what_to_use():
    with pytest.raises(ValueError, match=r"classifier head \('score'\): wrap it with apply_qst or "
                                         r"QSTForSequenceClassification, not QSTModel"):
        QSTModel(tiny_classifier("llama"), QSTConfig(r=4))
    with pytest.raises(ValueError, match=r"QSTForSequenceClassification needs a sequence classifier"):
        QSTForSequenceClassification(tiny_causal_lm("llama"), QSTConfig(r=4))
    qst = apply_qst(tiny_classifier("llama"), QSTConfig(r=4))
    with pytest.raises(TypeError, match=r"has no LM head to generate with"):
        qst.generate(input_ids=torch.ones(1, 3, dtype=torch.long))
    assert isinstance(qst.score, nn.Linear) and qst.get_output_embeddings() is None
