"""The LM head and its loss as a planned unit: chunked over token rows, exact where it can be, planned by budget.

A frozen head (LoRA, QLoRA, QST, frozen embeddings) keeps every gradient bitwise (rows cut at multiples of 64);
a trained head's weight gradient is a sum over chunks: equal within float rounding, which the report says and
``MemoptConfig(exact=True)`` forbids.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F

import memopt
from memopt.graph import Decision, Plan
from memopt.meter import MemoryMeter
from memopt.planners import simulate
from memopt.runtime.chunked_loss import ChunkSpec, chunked_linear_cross_entropy
from memopt.testing import hf_causal_lm, hf_sample, hf_t5, hf_t5_sample, max_difference, metered_step, snapshot

pytest.importorskip("transformers")

FAMILIES = {"llama": "num_hidden_layers", "gpt2": "n_layer", "qwen2": "num_hidden_layers",
            "gemma": "num_hidden_layers", "gemma2": "num_hidden_layers", "opt": "num_hidden_layers"}
VOCAB = 1024


def _post(kind: str):
    return {"plain": (), "softcap": (lambda x: x.float(), lambda x: x / 30.0, torch.tanh, lambda x: x * 30.0)}[kind]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("post", ["plain", "softcap"])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_matches_the_unchunked_graph(reduction, post, bias):
    torch.manual_seed(0)
    rows, hidden, vocab = 320, 64, 300
    h = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True) if bias else None
    target = torch.randint(0, vocab, (rows,))
    target[::5] = -100
    ops = _post(post)
    for scale in (1.0, 0.125):  # loss.backward(), and a loss scaled for gradient accumulation
        logits = F.linear(h, w, b)
        for op in ops:
            logits = op(logits)
        reference = F.cross_entropy(logits, target, reduction=reduction)
        expected = torch.autograd.grad(reference * scale, [t for t in (h, w, b) if t is not None])
        got_loss = chunked_linear_cross_entropy(h, w, b, target, ChunkSpec(64, ops, reduction=reduction))
        got = torch.autograd.grad(got_loss * scale, [t for t in (h, w, b) if t is not None])
        assert torch.equal(expected[0], got[0]), "hidden-state gradients are bitwise the unchunked ones"
        for e, g in zip(expected[1:], got[1:]):
            assert torch.allclose(e, g, rtol=1e-5, atol=1e-6), (e - g).abs().max()
        assert torch.allclose(reference, got_loss, rtol=1e-6)


def _model(family: str, frozen: bool):
    attention = "eager" if family == "gemma2" else "sdpa"  # Gemma-2 soft-caps attention: eager only
    model = hf_causal_lm(family, attn_implementation=attention, vocab_size=VOCAB, **{FAMILIES[family]: 2})
    if frozen:
        model.get_output_embeddings().weight.requires_grad_(False)
    return model


def _plan_with_head(model, batch, chunks: int) -> Plan:
    graph = memopt.profile(model, batch, memopt.MemoptConfig(profile_repeats=1, profile_warmup=0))
    option = graph.head.option(chunks)
    return Plan([Decision(u.name) for u in graph.units], 1, 1, 0, 0.0, 0.0, 0, head_chunks=chunks,
                head_chunk_rows=option.chunk_rows)


LR = 1e-3


def _train_adamw(model, batches):
    """3 AdamW steps; returns the parameters after, the losses and the first step's gradients."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, first_grads = [], None
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        if first_grads is None:
            first_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        opt.step()
        opt.zero_grad()
    return snapshot(model), losses, first_grads


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_train_exactly_or_within_rounding(family, frozen):
    batches = [hf_sample(vocab_size=VOCAB, seq=256, seed=i) for i in range(3)]
    reference, reference_losses, reference_grads = _train_adamw(_model(family, frozen), batches)
    model = _model(family, frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = memopt.apply(model, _plan_with_head(model, batches[0], chunks=8))
    params, losses, grads = _train_adamw(model, batches)
    stats, exactness = handle.stats(), handle.exactness()
    handle.remove()
    assert stats["head_chunked_calls"] == 3 and not stats["head_notes"]
    if frozen:
        assert max_difference(reference, params) == 0.0
        assert exactness == "every gradient bitwise as without memopt"
        return
    assert "within float rounding" in exactness
    # The loss and the gradients agree within float32 rounding; after 3 AdamW steps (which divide each gradient
    # by its own running scale) the parameters differ by at most a hundredth of a step (lr).
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(losses, reference_losses))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads, reference_grads))
    assert max_difference(reference, params) <= LR / 100


def test_training_output_has_no_logits_but_eval_and_a_callers_loss_still_do():
    model, batch = _model("llama", frozen=True), hf_sample(vocab_size=VOCAB, seq=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = memopt.apply(model, _plan_with_head(model, batch, chunks=4))
    out = model(**batch)
    assert out.logits is None and out.loss.requires_grad
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 256, VOCAB)
    # Without labels the model computes no loss: the caller's own cross-entropy still runs chunked.
    lazy = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(lazy[:, :-1].reshape(-1, VOCAB), batch["input_ids"][:, 1:].reshape(-1))
    assert handle.stats()["head_notes"], "a slice of the logits needs their values: computed whole, and said so"
    loss.backward()
    handle.remove()


def test_the_simulator_predicts_each_head_option_within_one_percent():
    model = hf_causal_lm("llama", attn_implementation="sdpa", vocab_size=4096, num_hidden_layers=2)
    batch = hf_sample(vocab_size=4096, seq=512)
    graph = memopt.profile(model, batch, memopt.MemoptConfig(profile_repeats=1, profile_warmup=0))
    assert [o.chunks for o in graph.head.options][:2] == [1, 2]
    peaks = []
    for option in graph.head.options:
        decisions = [Decision(u.name) for u in graph.units]
        predicted = simulate(graph, decisions, head_chunks=option.chunks).peak_bytes - graph.states_without_grads_bytes
        plan = Plan(decisions, 1, 1, 0, 0.0, 0.0, 0, head_chunks=option.chunks,
                    head_chunk_rows=option.chunk_rows if option.chunks > 1 else 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = memopt.apply(model, plan)
        measured = metered_step(model, batch)
        handle.remove()
        assert abs(predicted - measured) <= 0.01 * measured, (option, predicted, measured)
        peaks.append(measured)
    assert peaks[-1] < 0.6 * peaks[0], peaks


@pytest.mark.parametrize("config, chunked", [
    ({}, True), ({"head": "off"}, False), ({"exact": True}, False), ({"exact": True, "frozen": True}, True),
], ids=["auto", "off", "exact-trained", "exact-frozen"])
def test_the_planner_chunks_the_head_where_the_budget_needs_it(config, chunked):
    config = dict(config)
    frozen = config.pop("frozen", False)
    model = hf_causal_lm("llama", attn_implementation="sdpa", vocab_size=8192, num_hidden_layers=2)
    if frozen:
        model.get_output_embeddings().weight.requires_grad_(False)
    batch = hf_sample(vocab_size=8192, seq=512)
    options = memopt.MemoptConfig(allow_swap=False, **config)
    graph = memopt.profile(model, batch, options)
    assert (graph.head is None) == (config.get("head") == "off")
    loose = memopt.plan(graph, 1.0, options)
    assert loose.head_chunks == 1, "a budget that does not need it costs nothing"
    if chunked:
        plan = memopt.plan(graph, 0.3, options)
        assert plan.head_chunks > 1 and "lm head + loss" in plan.summary()
        assert memopt.Plan.from_json(plan.to_json()) == plan
    else:
        with pytest.raises(memopt.BudgetError, match="head"):
            memopt.plan(graph, 0.3, options)


CASES = {
    # The issue's Llama: 8 layers, hidden 256, vocab 8192, 2 x 1024 tokens.
    "llama-8192": (lambda: hf_causal_lm("llama", attn_implementation="sdpa", vocab_size=8192, num_hidden_layers=8,
                                        hidden_size=256, intermediate_size=512),
                   lambda: hf_sample(vocab_size=8192, seq=1024)),
    "t5": (hf_t5, hf_t5_sample),
}


@pytest.mark.parametrize("name", list(CASES))
def test_at_hf_checkpointings_own_bytes_memopt_plans_and_holds_them(name):
    """The issue's cases: a budget of the activation bytes HF gradient checkpointing really holds (independent
    meter) had no plan, the head setting the floor. Now one exists, and the step holds no more."""
    make, sample = CASES[name]
    batch = sample()
    checkpointed = make()
    checkpointed.gradient_checkpointing_enable()
    hf_bytes = metered_step(checkpointed, batch)
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = memopt.profile(model, batch, memopt.MemoptConfig(profile_repeats=1, profile_warmup=0))
        plan = memopt.plan(graph, graph.states_without_grads_bytes + hf_bytes)
        handle = memopt.apply(model, plan, graph=graph)
    measured = metered_step(model, batch)
    handle.remove()
    assert plan.head_chunks > 1, plan.summary()
    assert measured <= hf_bytes, (measured, hf_bytes, plan.summary())


@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])
def test_chunked_and_exact_together_are_refused_where_they_conflict(frozen):
    """head='chunked' asks for chunks; exact=True forbids them for a trained head: said, not silently dropped."""
    model = hf_causal_lm("llama", attn_implementation="sdpa", vocab_size=4096, num_hidden_layers=2)
    if frozen:
        model.get_output_embeddings().weight.requires_grad_(False)
    options = memopt.MemoptConfig(allow_swap=False, head="chunked", exact=True)
    graph = memopt.profile(model, hf_sample(vocab_size=4096, seq=256), options)
    if frozen:  # a frozen head's chunks keep every gradient bitwise: no conflict
        assert memopt.plan(graph, 1.0, options).head_chunks > 1
        return
    with pytest.raises(ValueError, match=r"head='chunked'.*exact=True.*MemoptConfig\(head='auto', exact=True\)"):
        memopt.plan(graph, 1.0, options)
