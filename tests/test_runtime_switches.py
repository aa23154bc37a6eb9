"""Models exactly as their configs build them: the KV cache and Hugging Face gradient checkpointing.

Most Hugging Face configs default to ``use_cache=True``; a training forward then fills a cache with every
layer's keys and values, and a recompute would append them again. memopt turns the cache off for training
forwards while a plan is applied (as Hugging Face gradient checkpointing does), shields a cache the caller
passes from every replay, and turns Hugging Face gradient checkpointing off for the plan's life. Each is
undone by ``handle.remove()``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import memopt
from memopt.testing import hf_causal_lm, hf_sample, max_difference, metered_loop

transformers = pytest.importorskip("transformers")

LAYERS = {"llama": "num_hidden_layers", "qwen2": "num_hidden_layers", "gpt2": "n_layer"}


def _model(family: str, **overrides):
    # attn_implementation=None: the implementation the config picks by default.
    return hf_causal_lm(family, attn_implementation=None, **{LAYERS[family]: 4}, **overrides)


@pytest.mark.parametrize("allow_swap", [False, True], ids=["recompute-only", "swap+recompute"])
@pytest.mark.parametrize("family", list(LAYERS))
def test_default_config_models_train_exactly_at_half_budget(family, allow_swap):
    batches = [hf_sample(seq=256, seed=i) for i in range(3)]
    reference_model = _model(family)
    assert reference_model.config.use_cache is True, "the config's own default is what users train with"
    reference, unoptimised = metered_loop(reference_model, batches)

    model = _model(family)
    with pytest.warns(UserWarning, match="use_cache=True"):
        handle = memopt.optimize(model, batches[0], 0.5, memopt.MemoptConfig(allow_swap=allow_swap))
    params, peak = metered_loop(model, batches)
    handle.remove()
    assert max_difference(reference, params) == 0.0
    if not allow_swap:
        # On a CPU only recompute frees memory the meter can see; swapped bytes land in the host arena.
        assert peak <= 0.55 * unoptimised, (peak, unoptimised, handle.plan.summary())


def test_training_forwards_drop_the_cache_others_keep_it_and_remove_restores():
    model, batch = _model("llama"), hf_sample(seq=64)
    with pytest.warns(UserWarning, match="use_cache=True"):
        handle = memopt.optimize(model, batch, 0.5)
    assert model(**batch).cache is None
    with torch.no_grad():
        assert model(**batch).cache.get_seq_length() == 64
    model.eval()
    assert model(**batch).cache.get_seq_length() == 64
    model.train()
    handle.remove()
    assert model(**batch).cache.get_seq_length() == 64
    assert model.config.use_cache is True


def test_generate_under_a_plan_equals_generate_without():
    model, batch = _model("llama"), hf_sample(seq=64)
    prompt = batch["input_ids"][:1, :16]
    model.eval()
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = memopt.optimize(model, batch, 0.5)
    model.eval()
    got = model.generate(prompt, max_new_tokens=12, do_sample=False)
    handle.remove()
    assert torch.equal(expected, got)


def _prefix_step(model, prefix_cache, batch):
    """One step on the tokens after a 64-token prefix held in ``prefix_cache`` (a prefix-tuning shape)."""
    model(input_ids=batch["input_ids"][:, 64:], labels=batch["labels"][:, 64:], cache=prefix_cache).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("budget", [0.5, "checkpoint-all"])
def test_a_replay_never_changes_the_callers_cache(budget):
    batch = hf_sample(seq=192)
    model = _model("llama")
    with torch.no_grad():
        prefix = model(input_ids=batch["input_ids"][:, :64], use_cache=True).cache
    expected_cache = copy.deepcopy(prefix)
    expected = _prefix_step(model, expected_cache, batch)
    model.zero_grad(set_to_none=True)

    sample = {"input_ids": batch["input_ids"][:, 64:], "labels": batch["labels"][:, 64:],
              "cache": copy.deepcopy(prefix)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if budget == "checkpoint-all":
            handle = memopt.apply(model, memopt.planners.baseline_plan(memopt.profile(model, sample), budget))
        else:
            # exact=True: the trained head unchunked, so the step's outputs are bitwise whatever the timing.
            handle = memopt.optimize(model, sample, budget, memopt.MemoptConfig(allow_swap=False, exact=True))
    assert any(d.recompute > 0 for d in handle.plan.decisions)
    cache = copy.deepcopy(prefix)
    got = _prefix_step(model, cache, batch)
    stats = handle.stats()
    handle.remove()
    assert stats["recomputes"] > 0
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    # Appended once, by the forward, exactly as without memopt; never by a replay.
    assert cache.get_seq_length() == expected_cache.get_seq_length() == 192
    for mine, theirs in zip(cache.layers, expected_cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_a_cache_updated_in_place_is_refused_by_name():
    model, batch = _model("llama"), hf_sample(seq=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = memopt.apply(model, memopt.planners.baseline_plan(memopt.profile(model, batch), "checkpoint-all"))
    static = transformers.StaticCache(config=model.config, max_cache_len=128)
    loss = model(**batch, cache=static).loss
    with pytest.raises(RuntimeError, match=r"unit 'model\.layers\.\d' updated its cache argument in place"):
        loss.backward()
    handle.remove()


def test_gradient_checkpointing_is_off_for_the_plans_life():
    batches = [hf_sample(seq=256, seed=i) for i in range(2)]
    reference, unoptimised = metered_loop(_model("llama"), batches)
    model = _model("llama")
    model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing
    with pytest.warns(UserWarning, match="gradient checkpointing is turned off"):
        handle = memopt.optimize(model, batches[0], 0.5, memopt.MemoptConfig(allow_swap=False))
    assert not model.is_activation_checkpointing
    params, peak = metered_loop(model, batches)
    handle.remove()
    assert model.is_activation_checkpointing
    assert max_difference(reference, params) == 0.0
    assert peak <= 0.55 * unoptimised
