"""The public API under misuse and unusual models: clear errors, exact gradients, clean removal."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import memopt
from memopt.testing import TinyMLP, hf_causal_lm, hf_sample, max_difference, snapshot, train


def _mlp():
    torch.manual_seed(0)
    return TinyMLP(depth=6)


def _x(seed: int = 0, rows: int = 256):
    return torch.randn(2, rows, 64, generator=torch.Generator().manual_seed(seed))


def test_import_is_light_and_leaves_cuda_alone():
    code = ("import sys, memopt, torch; "
            "heavy = [m for m in ('pulp', 'transformers', 'deepspeed', 'bitsandbytes', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy; assert not torch.cuda.is_initialized(); "
            "memopt.MemoptConfig(); memopt.Plan; assert 'pulp' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_budget_error_names_smallest_feasible_budget_which_then_works():
    model, x = _mlp(), _x()
    graph = memopt.profile(model, x)
    with pytest.raises(memopt.BudgetError) as info:
        memopt.plan(graph, graph.model_state_bytes)
    error = info.value
    assert error.min_feasible_bytes > graph.model_state_bytes
    assert str(error.min_feasible_bytes) in str(error) and error.dominated_by
    plan = memopt.plan(graph, error.min_feasible_bytes)
    assert plan.predicted_peak_bytes <= error.min_feasible_bytes


def test_budget_error_when_model_states_alone_exceed_budget():
    model, x = _mlp(), _x()
    graph = memopt.profile(model, x)
    with pytest.raises(memopt.BudgetError, match="model states"):
        memopt.plan(graph, graph.model_state_bytes // 2)


@pytest.mark.parametrize("budget, message", [
    (-5, "positive"), (0, "positive"), ("twelve gigs", "byte count"), (1.5, r"neither a fraction in \(0, 1\]"),
    ("1.5", r"neither a fraction in \(0, 1\]"), (0.0, "positive"), (float("nan"), "positive"), ([1], "int or a string"),
])
def test_bad_budgets_are_rejected_with_the_value(budget, message):
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        memopt.optimize(model, _x(), budget)
    assert not hasattr(model, "_memopt_handle") and "forward" not in model.blocks[0].__dict__
    assert max_difference(before, snapshot(model)) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"units": "blocks.*"}, "list of module paths"), ({"units": []}, "empty"), ({"row_multiple": 0}, "row_multiple"),
    ({"mip_gap": 2}, "mip_gap"), ({"on_shape_change": "pray"}, "on_shape_change"),
    ({"allow_swap": False, "allow_recompute": False}, "nothing could save"), ({"host_budget": "lots"}, "host_budget"),
])
def test_bad_config_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memopt.MemoptConfig(**kwargs)


def test_unknown_or_nested_unit_patterns_are_rejected():
    with pytest.raises(ValueError, match="matches no module"):
        memopt.profile(_mlp(), _x(), memopt.MemoptConfig(units=["decoder.*"]))
    with pytest.raises(ValueError, match="must not nest"):
        memopt.profile(_mlp(), _x(), memopt.MemoptConfig(units=["blocks.0", "blocks.0.1"]))


def test_nested_optimize_is_a_clear_error_and_remove_restores_everything():
    model = _mlp()
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = memopt.optimize(model, _x(), 0.5)
    with pytest.raises(RuntimeError, match="already optimized"):
        memopt.optimize(model, _x(), 0.5)
    assert any("forward" in block.__dict__ for block in model.blocks)
    handle.remove()
    handle.remove()  # idempotent
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert not hasattr(model, "_memopt_handle")
    after = model.state_dict()
    assert list(after) == list(keys_before)
    assert all(torch.equal(after[k], v) for k, v in keys_before.items())
    memopt.optimize(model, _x(), 0.5).remove()  # can be optimized again after removal


def test_other_batch_shape_falls_back_to_exact_recompute_and_replan_adapts():
    model = _mlp()
    handle = memopt.optimize(model, _x(), 0.5, memopt.MemoptConfig(allow_swap=False))
    assert any(d.token_wise and 0 < d.keep_rows < d.rows for d in handle.plan.decisions), handle.plan.summary()
    other = [_x(seed, rows=192) for seed in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = train(model, other)
    assert any("another shape" in str(w.message) for w in caught)
    assert handle.stats()["shape_fallbacks"] > 0
    handle.replan(other[0])
    assert all(d.rows in (0, 2 * 192) for d in handle.plan.decisions)
    handle.remove()
    assert max_difference(train(_mlp(), other), got) == 0.0


@pytest.mark.parametrize("written, meant", [
    ("0.5", 0.5), ("0.25", 0.25), ("50%", 0.5), (" 25 %", 0.25), ("100%", 1.0), (12e9, 12_000_000_000),
    ("1e9", 1_000_000_000), ("12GiB", 12 << 30), (4096, 4096),
])
def test_budgets_as_users_write_them(written, meant):
    """A fraction written as a string (a command line, a JSON config) is a fraction; a whole float (JSON's 12e9)
    is bytes."""
    graph = memopt.profile(_mlp(), _x())
    assert memopt.api.resolve_budget(graph, written) == memopt.api.resolve_budget(graph, meant)
    if written == "0.5":
        assert memopt.plan(graph, written).budget_bytes == memopt.plan(graph, meant).budget_bytes


@pytest.mark.parametrize("written", ["150%", "0%", "-5%", "half%", "%"])
def test_a_percentage_outside_0_to_100_is_refused_by_name(written):
    with pytest.raises(ValueError, match=r"is not a percentage in \(0, 100\]"):
        memopt.units.parse_budget(written)


def test_a_failed_replan_leaves_the_running_plan_in_place():
    model = _mlp()
    handle = memopt.optimize(model, _x(), 0.5, memopt.MemoptConfig(allow_swap=False))
    before = handle.plan
    with pytest.raises(memopt.BudgetError):
        handle.replan(_x(rows=192), budget=1024)
    assert handle.active and handle.plan is before and model._memopt_handle is handle
    assert all("forward" in block.__dict__ for block in model.blocks)
    got = train(model, [_x(1), _x(2)])
    assert handle.stats()["recomputes"] > 0, "the old plan still runs"
    with pytest.raises(ValueError, match="budget"):
        handle.replan(_x(), budget="lots")
    assert handle.active and handle.plan is before
    handle.remove()
    assert max_difference(train(_mlp(), [_x(1), _x(2)]), got) == 0.0


def test_shape_change_can_be_an_error():
    model = _mlp()
    handle = memopt.optimize(model, _x(), 0.5, memopt.MemoptConfig(allow_swap=False, on_shape_change="error"))
    with pytest.raises(ValueError, match="replan"):
        model(_x(rows=192)).backward()
    handle.remove()


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x, scale=1.0):
        y = torch.tanh(self.proj(x)) * scale
        return x + y, {"aux": y.square().mean()}


class _TupleModel(nn.Module):
    """Blocks that return (tensor, dict) and take keyword arguments; the model returns a tuple."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_TupleBlock() for _ in range(8))

    def forward(self, x):
        aux = 0.0
        for block in self.blocks:
            x, extra = block(x, scale=0.5)
            aux = aux + extra["aux"]
        return x, aux


class _TiedModel(nn.Module):
    """An embedding whose weight the output layer shares (tied weights)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.ReLU()) for _ in range(8))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return {"logits": x @ self.embed.weight.t()}


@pytest.mark.parametrize("factory, sample, loss_fn", [
    (_TupleModel, lambda: torch.randn(4, 16, 32), lambda out, sample: out[0].square().mean() + out[1]),
    (_TiedModel, lambda: torch.randint(0, 50, (2, 64)),
     lambda out, ids: nn.functional.cross_entropy(out["logits"].flatten(0, 1), ids.flatten())),
])
@pytest.mark.parametrize("budget", [0.75, 0.55])
def test_tuple_dict_outputs_and_tied_weights(factory, sample, loss_fn, budget):
    torch.manual_seed(3)
    batches = [sample() for _ in range(3)]
    config = memopt.MemoptConfig(loss_fn=loss_fn)
    torch.manual_seed(0)
    ref = train(factory(), batches, config)
    torch.manual_seed(0)
    model = factory()
    handle = memopt.optimize(model, batches[0], budget, config)
    got = train(model, batches, config)
    handle.remove()
    assert max_difference(ref, got) == 0.0


def test_missing_loss_is_a_clear_error():
    model = _TupleModel()
    with pytest.raises(ValueError, match="loss_fn"):
        memopt.optimize(model, torch.randn(4, 16, 32), 0.5)
    assert "forward" not in model.blocks[0].__dict__


def test_handle_report_and_stats_after_training():
    model = hf_causal_lm("llama", num_hidden_layers=4)
    handle = memopt.optimize(model, hf_sample(seq=128), 0.5)
    train(model, [hf_sample(seq=128, seed=1)])
    report, stats = handle.report(), handle.stats()
    assert "predicted peak" in report and "model.layers.0" in report
    assert stats["unit_forward_calls"] >= 1
    assert repr(handle).startswith("<memopt.Handle active")
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.stats()


def test_the_report_shows_what_a_selective_unit_keeps_as_the_cli_does():
    """A selective recompute keeps its matmul and attention outputs and reruns the rest: the handle's report shows
    the share of saved bytes kept and the share of the forward rerun (memopt plan's figures), not 0 kept."""
    from memopt.graph import Decision, Mode, Plan
    from memopt.planners.simulator import unit_amounts

    model, batch = hf_causal_lm("llama", num_hidden_layers=2), hf_sample(seq=128)
    graph = memopt.profile(model, batch)
    decisions = [Decision(graph.units[0].name, 0, 0, 1, Mode.SELECTIVE), Decision(graph.units[1].name)]
    plan = Plan(decisions, 1, 1, 0, 0.0, 0.0, 0)
    handle = memopt.apply(model, plan, graph=graph)
    row = next(line for line in handle.report().splitlines() if line.startswith(graph.units[0].name))
    handle.remove()
    amounts = unit_amounts(graph.units[0], decisions[0])
    keep, swap, recompute = (float(x) for x in row.split()[-3:])
    assert keep == round(amounts.kept_bytes / graph.units[0].saved_bytes, 2) and 0 < keep < 1
    assert swap == 0 and recompute == round(amounts.recompute, 2) and 0 < recompute < 1
    assert plan.summary().splitlines()[1].split()[-3:] == ["0.00", "0.00", "1.00"]  # no graph: the decision's own


def test_plan_json_round_trip_and_apply_from_saved_plan():
    model = _mlp()
    graph = memopt.profile(model, _x())
    plan = memopt.plan(graph, 0.5)
    again = memopt.Plan.from_json(plan.to_json())
    assert again == plan
    assert memopt.TrainingGraph.from_json(graph.to_json()) == graph
    handle = memopt.apply(model, again)
    got = train(model, [_x(1), _x(2)])
    handle.remove()
    assert max_difference(train(_mlp(), [_x(1), _x(2)]), got) == 0.0


def test_plan_for_another_model_is_rejected():
    plan = memopt.plan(memopt.profile(_mlp(), _x()), 0.5)
    other = hf_causal_lm("llama", num_hidden_layers=2)
    with pytest.raises(ValueError, match="units"):
        memopt.apply(other, plan)
    assert not hasattr(other, "_memopt_handle")


def test_retain_graph_twice():
    """A second backward through a retained graph: exact for keep/swap/recompute, a clear error when split by rows."""
    x = _x()
    torch.manual_seed(0)
    ref_model = TinyMLP(depth=6)
    loss = ref_model(x)
    loss.backward(retain_graph=True)
    loss.backward()
    reference = [p.grad.clone() for p in ref_model.parameters()]
    for config, splits in ((memopt.MemoptConfig(token_separable={"blocks.*": False}), False),
                           (memopt.MemoptConfig(allow_swap=False), True)):
        model = _mlp()
        handle = memopt.optimize(model, x, 0.5, config)
        loss = model(x)
        loss.backward(retain_graph=True)
        if splits:
            assert any(d.token_wise and 0 < d.keep_rows < d.rows for d in handle.plan.decisions)
            with pytest.raises(RuntimeError, match="retain_graph"):
                loss.backward()
        else:
            loss.backward()
            assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), reference))
        handle.remove()


def test_autocast_is_replayed_in_recompute():
    """A step under CPU autocast (bf16): recomputed and selective units replay under the same autocast state."""
    from memopt.graph import Decision, Plan

    def step(model):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**hf_sample(seq=128))
        loss.loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = step(hf_causal_lm("llama", num_hidden_layers=4))
    model = hf_causal_lm("llama", num_hidden_layers=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graph = memopt.profile(model, hf_sample(seq=128))
    modes = [Decision(u.name, 0.0, 0.0, 1.0, "selective" if i % 2 == 0 else "recompute") for i, u in enumerate(graph.units)]
    handle = memopt.apply(model, Plan(modes, 1, 1, 0, 0.0, 0.0, 0))
    got = step(model)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(reference, got))


def test_retain_graph_twice_with_selective_recompute():
    """The second backward computes the expensive ops again (their kept outputs went to the first): exact."""
    from memopt.graph import Decision, Plan

    def grads_twice(model):
        loss = model(**hf_sample(seq=128)).loss
        loss.backward(retain_graph=True)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = grads_twice(hf_causal_lm("gpt2", attn_implementation="sdpa", n_layer=3))
    model = hf_causal_lm("gpt2", attn_implementation="sdpa", n_layer=3)
    graph = memopt.profile(model, hf_sample(seq=128))
    handle = memopt.apply(model, Plan([Decision(u.name, 0.0, 0.0, 1.0, "selective") for u in graph.units],
                                      1, 1, 0, 0.0, 0.0, 0))
    got = grads_twice(model)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(reference, got))


class _Plain(nn.Module):
    """Residual MLP blocks returning the hidden states (no loss of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = _mlp().blocks

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _frozen():
    model = _mlp()
    model.requires_grad_(False)
    return model


def _hf_llama():
    pytest.importorskip("transformers")
    return hf_causal_lm("llama", num_hidden_layers=2)


def _meta():
    with torch.device("meta"):
        return TinyMLP(depth=6)


@pytest.mark.parametrize("make, sample, config, error, message", [
    (_frozen, _x, {}, ValueError, "no parameter of the model requires grad"),
    (_meta, _x, {}, ValueError, "meta device .* memopt plan"),
    (_Plain, _x, {"loss_fn": lambda output, sample: output}, ValueError,
     r"loss_fn returned a tensor of shape \(2, 256, 64\); it must return a scalar"),
    (_mlp, lambda: (_x(), torch.zeros(2)), {}, TypeError, r"as model\(\*sample\) failed.*loss_fn"),
    (_Plain, _x, {"loss_fn": lambda output, sample: F.mse_loss(output, torch.zeros(3, 256, 64))}, ValueError,
     r"loss_fn raised RuntimeError: .* on a sample of shapes \(2, 256, 64\).*targets it closes over must match"),
    (_hf_llama, lambda: {"input_ids": torch.randint(0, 256, (1, 64))}, {}, ValueError,
     r"without a \.loss\. A Hugging Face model computes its loss when the batch has 'labels' \(its keys: "
     r"\['input_ids'\]\).*Or pass MemoptConfig\(loss_fn="),
], ids=["frozen", "meta", "non-scalar-loss_fn", "sample-with-targets", "loss_fn-raises", "hf-without-labels"])
def test_user_mistakes_get_memopt_errors_and_leave_the_model_bare(make, sample, config, error, message):
    model = make()
    with pytest.raises(error, match=message):
        memopt.optimize(model, sample(), 0.5, memopt.MemoptConfig(**config))
    assert not hasattr(model, "_memopt_handle")
    assert all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in model.modules())


def test_an_eval_mode_model_is_profiled_with_a_warning_at_the_callers_line():
    model = _mlp().eval()
    with pytest.warns(UserWarning, match="eval mode, so dropout is off") as caught:
        memopt.optimize(model, _x(), 0.5).remove()
    assert [w.filename for w in caught if "eval mode" in str(w.message)] == [__file__]
