"""QST ``generate`` with the side network's KV cache: the same tokens as without it, each token through
the backbone once, and the modes that cannot use a cache fall back to running without one."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from memopt.qst import QSTConfig, apply_qst  # noqa: E402
from memopt.qst.layers import SideCache  # noqa: E402
from memopt.qst.testing import FAMILIES, tiny_causal_lm, wake_side  # noqa: E402


@contextlib.contextmanager
def _backbone_tokens(qst):
    """Counts the tokens per row the backbone embeds (every token it processes passes there once)."""
    seen = [0]

    def count(_module, args):
        seen[0] += args[0].shape[1]

    handle = qst.backbone.get_input_embeddings().register_forward_pre_hook(count)
    try:
        yield seen
    finally:
        handle.remove()


def _prompt(batch: int = 2, tokens: int = 7, padded: bool = True) -> dict:
    ids = torch.randint(2, 128, (batch, tokens), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding, as batched generation has
        ids[1, :3] = 1
    return {"input_ids": ids, "attention_mask": mask, "pad_token_id": 1}


def _woken(family: str, **config) -> torch.nn.Module:
    qst = apply_qst(tiny_causal_lm(family), QSTConfig(r=4, **config)).eval()
    wake_side(qst, std=3.0)  # a side network that moves the argmax, so the test sees whether it is used
    return qst


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_generation_equals_uncached_token_for_token(family):
    qst = _woken(family)
    prompt, new = _prompt(), 24
    with _backbone_tokens(qst) as cached_tokens:
        cached = qst.generate(**prompt, max_new_tokens=new, do_sample=False)
    with _backbone_tokens(qst) as uncached_tokens:
        uncached = qst.generate(**prompt, max_new_tokens=new, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    backbone_only = qst.backbone.generate(**prompt, max_new_tokens=new, do_sample=False)
    assert not torch.equal(backbone_only, cached)
    # The last new token is never fed back: prompt + (new - 1) tokens, against one re-run per step.
    length = prompt["input_ids"].shape[1]
    assert cached_tokens[0] == length + new - 1
    assert uncached_tokens[0] == sum(length + k for k in range(new))


def test_256_new_tokens_pass_the_backbone_once_each():
    qst = _woken("llama")
    prompt = _prompt(tokens=8)
    with _backbone_tokens(qst) as tokens:
        out = qst.generate(**prompt, max_new_tokens=256, min_new_tokens=256, do_sample=False)
    assert out.shape == (2, 8 + 256)
    assert tokens[0] == 8 + 255  # uncached: 34,688


def test_cached_sampling_draws_the_same_tokens_as_uncached():
    qst = _woken("qwen2")
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(qst.generate(**_prompt(), max_new_tokens=16, do_sample=True, top_k=0, use_cache=use_cache))
    assert torch.equal(*runs)


@pytest.mark.parametrize("kwargs, cached", [
    ({}, True),
    ({"do_sample": True}, True),
    ({"use_cache": False}, False),
    ({"num_beams": 2}, False),
    ({"prompt_lookup_num_tokens": 3}, False),
    ({"generation_config": {"num_beams": 3}}, False),
    ({"generation_config": {"prompt_lookup_num_tokens": 2}}, False),
    ({"generation_config": {"do_sample": True}}, True),
])
def test_modes_that_rewind_or_reorder_a_cache_run_without_one(kwargs, cached):
    from transformers import GenerationConfig

    if "generation_config" in kwargs:
        kwargs = {"generation_config": GenerationConfig(**kwargs["generation_config"])}
    assert _woken("llama")._cache_applies(kwargs) is cached


def test_beam_search_runs_uncached_and_uses_the_side_network():
    qst = _woken("gpt2")
    prompt = _prompt(padded=False)
    with _backbone_tokens(qst) as tokens:
        beams = qst.generate(**prompt, max_new_tokens=6, num_beams=2, do_sample=False)
    assert tokens[0] == sum(7 + k for k in range(6))  # the whole sequence at every step
    backbone_only = qst.backbone.generate(**prompt, max_new_tokens=6, num_beams=2, do_sample=False)
    assert beams.shape == backbone_only.shape and not torch.equal(beams, backbone_only)


def test_side_network_refuses_a_mask_that_does_not_cover_its_cache():
    qst = _woken("llama")
    states = [torch.randn(1, 1, 64) for _ in range(3)]
    cache = SideCache()
    qst.side([torch.randn(1, 5, 64) for _ in range(3)], torch.randn(1, 5, 64), torch.ones(1, 5), cache)
    assert cache.length == 5 and len(cache.keys) == 2
    with pytest.raises(RuntimeError, match=r"mask covers 4 tokens, but the side network's cache holds 5 and 1 are "
                                           r"new; .* needs use_cache=False"):
        qst.side(states, torch.randn(1, 1, 64), torch.ones(1, 4), cache)


def test_cached_side_step_equals_the_uncached_side_on_the_whole_sequence():
    """The side network alone: prefix through the cache, then one token, against all tokens at once."""
    qst = _woken("llama")
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 9, 64, generator=generator) for _ in range(3)]
    final = torch.randn(2, 9, 64, generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        whole = qst.side(states, final, mask)
        cache = SideCache()
        qst.side([s[:, :8] for s in states], final[:, :8], mask[:, :8], cache)
        step = qst.side([s[:, 8:] for s in states], final[:, 8:], mask, cache)
    torch.testing.assert_close(step, whole[:, 8:], atol=1e-5, rtol=1e-5)
