"""A module the step calls k times is k planning units, one per call in call order.

ALBERT runs one layer ``num_hidden_layers`` times; looped (recurrent-depth) models run one block a
variable number of times. Each call saves its own activations, so each is planned on its own:
``path#0``, ``path#1``, ... in call order.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import memopt
from memopt.testing import TinyMLP, max_difference, metered_loop, train

transformers = pytest.importorskip("transformers")

SHARED = "albert.encoder.albert_layer_groups.0"


def _albert():
    torch.manual_seed(0)
    config = transformers.AlbertConfig(hidden_size=64, embedding_size=32, num_hidden_layers=6, num_attention_heads=4,
                                       intermediate_size=128, vocab_size=256, max_position_embeddings=256,
                                       hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return transformers.AlbertForMaskedLM(config).train()


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("units", [None, [SHARED]], ids=["found", "named"])
def test_albert_plans_each_call_of_its_shared_layer(units):
    batches = [_batch(i) for i in range(3)]
    reference, unoptimised = metered_loop(_albert(), batches)
    model = _albert()
    # exact=True: the MLM head is tied to the embeddings and trained, so a chunked head (which the planner may
    # pick when the profiled times favour it) would make its gradient a sum over chunks, not bitwise.
    config = memopt.MemoptConfig(units=units, allow_swap=False, exact=True)
    handle = memopt.optimize(model, batches[0], 0.5, config)
    assert [d.unit for d in handle.plan.decisions] == [f"{SHARED}#{i}" for i in range(6)]
    assert any(d.recompute for d in handle.plan.decisions), handle.plan.summary()
    params, peak = metered_loop(model, batches)
    stats = handle.stats()
    handle.remove()
    assert stats["call_fallbacks"] == 0 and stats["recomputes"] > 0
    assert max_difference(reference, params) == 0.0
    assert peak <= 0.55 * unoptimised, (peak, unoptimised, handle.plan.summary())


def test_a_plan_with_call_units_round_trips_through_json():
    model, batch = _albert(), _batch()
    plan = memopt.plan(memopt.profile(model, batch), 0.5)
    again = memopt.Plan.from_json(plan.to_json())
    assert again == plan
    handle = memopt.apply(model, again)
    model(**batch).loss.backward()
    # Every call that does not keep everything runs under its own unit's frame.
    assert handle.stats()["unit_forward_calls"] == sum(d.mode != "keep" for d in plan.decisions) > 0
    handle.remove()


class Looped(nn.Module):
    """One residual MLP block applied ``depth`` times (a recurrent-depth model), with a head of its own."""

    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.depth = depth
        self.stem = nn.Linear(64, 64)
        self.block = TinyMLP(depth=1).blocks[0]
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(self.depth):
            x = x + self.block(x)
        return self.head(x).square().mean()


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(seed))


def test_a_looped_block_is_found_and_each_iteration_planned():
    model = Looped()
    handle = memopt.optimize(model, _x(), 0.4, memopt.MemoptConfig(allow_swap=False))
    assert [d.unit for d in handle.plan.decisions] == [f"block#{i}" for i in range(5)]
    got = train(model, [_x(1), _x(2)])
    handle.remove()
    assert max_difference(train(Looped(), [_x(1), _x(2)]), got) == 0.0


def test_more_calls_than_planned_are_recomputed_exactly_with_a_warning():
    model = Looped(depth=3)
    handle = memopt.optimize(model, _x(), 0.7, memopt.MemoptConfig(allow_swap=False))
    model.depth = 5
    with pytest.warns(UserWarning, match=r"'block' was called 4 times in one step but planned for 3 calls"):
        got = train(model, [_x(1), _x(2)])
    assert handle.stats()["call_fallbacks"] == 2 * 2
    handle.remove()
    assert max_difference(train(Looped(depth=5), [_x(1), _x(2)]), got) == 0.0


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"proj": nn.Linear(64, 64)})
        self.decoder = nn.Linear(64, 1)

    def forward(self, x):
        return self.decoder(self.encoder["proj"](x).relu()).mean()


def test_no_blocks_at_all_names_a_path_the_model_has():
    model = Flat()
    with pytest.raises(ValueError, match=r"no block is called more than once per step.*units=\['encoder\.\*'\]"):
        memopt.optimize(model, torch.randn(2, 8, 64), 0.5)


def test_a_plan_naming_calls_out_of_order_is_refused():
    model = Looped(depth=2)
    plan = memopt.planners.baseline_plan(memopt.profile(model, _x()), "checkpoint-all")
    plan.decisions.reverse()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"out of order: the calls of 'block' must be numbered block#0, block#1"):
            memopt.apply(model, plan)
    assert "forward" not in model.block.__dict__
