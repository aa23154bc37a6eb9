"""The live profiler: what it counts as an activation, what it finds separable, and that it leaves no trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt
from memopt.testing import TinyConvNet, TinyMLP, hf_causal_lm, hf_sample


class _Square(nn.Module):
    """Saves its input twice through two views of one storage: ``x * x.view(...)``."""

    def forward(self, x):
        return x * x.view(x.shape)


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x)


class _Stack(nn.Module):
    def __init__(self, block, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.sum()


def test_parameters_are_never_activations_and_views_count_once():
    x = torch.randn(4, 128, 64, requires_grad=True)
    nbytes = x.numel() * 4
    # A linear saves its input; its weight is a parameter and does not count. These units are token-separable:
    # a token-wise split copies rows of every saved tensor, the batch included, so all count whole.
    graph = memopt.profile(_Stack(_Linear), x)
    assert all(u.token_separable for u in graph.units)
    assert [u.tensor_bytes for u in graph.units] == [[nbytes]] * 3
    assert [u.input_bytes for u in graph.units] == [nbytes] * 3
    graph = memopt.profile(_Stack(_Square), x)
    assert [u.tensor_bytes for u in graph.units] == [[nbytes]] * 3


def test_the_batch_frees_nothing_when_not_split_by_rows():
    """Held whole, the batch outlives the step anyway: dropping it frees nothing, so it counts 0 bytes."""
    x = torch.randn(4, 128, 64, requires_grad=True)
    nbytes = x.numel() * 4
    config = memopt.MemoptConfig(token_separable={"blocks.*": False})
    graph = memopt.profile(_Stack(_Linear), x, config)
    assert [u.tensor_bytes for u in graph.units] == [[0], [nbytes], [nbytes]]
    assert [u.input_bytes for u in graph.units] == [0, nbytes, nbytes]


@pytest.mark.parametrize("factory, sample, separable", [
    (lambda: TinyMLP(depth=3), lambda: torch.randn(2, 128, 64), True),
    (lambda: TinyMLP(depth=3, dropout=0.1), lambda: torch.randn(2, 128, 64), False),
    (lambda: TinyConvNet(depth=3), lambda: (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))), False),
    (lambda: hf_causal_lm("llama", num_hidden_layers=2), lambda: hf_sample(seq=128), False),
])
def test_separability_probe(factory, sample, separable):
    graph = memopt.profile(factory(), sample())
    assert {u.token_separable for u in graph.units} == {separable}
    if separable:
        unit = graph.units[0]
        assert unit.tokens == 2 * 128
        assert all(d is not None for d in unit.token_dims)


def test_declared_separability_overrides_the_probe():
    config = memopt.MemoptConfig(token_separable={"blocks.*": False})
    graph = memopt.profile(TinyMLP(depth=3), torch.randn(2, 128, 64), config)
    assert not any(u.token_separable for u in graph.units)


@pytest.mark.parametrize("factory, sample", [
    (lambda: TinyConvNet(depth=3), lambda: (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))),
    (lambda: hf_causal_lm("gpt2"), lambda: hf_sample(seq=64)),
])
def test_profiling_leaves_no_trace(factory, sample):
    torch.manual_seed(0)
    model = factory()
    batch = sample()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    memopt.profile(model, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
    assert all(p.grad is None for p in params[1:])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # BatchNorm running stats included
    assert model.training
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_graph_figures_are_consistent():
    model = hf_causal_lm("llama", num_hidden_layers=3)
    graph = memopt.profile(model, hf_sample(seq=128))
    params = sum(p.numel() * 4 for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    # AdamW by default: exp_avg and exp_avg_sq in the parameters' dtype, and a 4-byte step per parameter.
    assert graph.param_bytes == params and graph.grad_bytes == params
    assert graph.optimizer_bytes == 2 * params + 4 * n_tensors
    assert len(graph.units) == 3 and all(u.saved_bytes > 0 and u.forward_s > 0 and u.backward_s > 0 for u in graph.units)
    # Every layer takes exactly the hidden states as its own input; the rotary tables (cos and sin), passed to
    # every layer, count once as shared inputs.
    assert [u.input_bytes for u in graph.units[1:]] == [2 * 128 * 64 * 4] * 2
    assert graph.units[0].input_bytes <= graph.units[1].input_bytes  # the first layer's is the embedding output
    assert graph.shared_input_bytes >= 2 * 128 * (64 // 4) * 4
