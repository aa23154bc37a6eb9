"""Model states as training stores them: each precision convention and optimizer against a hand count, and a
live optimizer's states read before its first step equal to what it holds after one."""

from __future__ import annotations

import warnings

import pytest
import torch

import memopt
from memopt.fake_profile import TrainingSetup, model_states
from memopt.precision import live_optimizer_states, optimizer_state_bytes
from memopt.testing import hf_causal_lm, hf_sample

N = 1_000_000
SHAPES = [(1000, 1000)]
# (precision, optimizer): (params, grads, optimizer) bytes for one 1000 x 1000 parameter, counted by hand.
TABLE = {
    ("32-true", "adamw"): (4 * N, 4 * N, 8 * N + 4),
    ("32-true", "sgd"): (4 * N, 4 * N, 0),
    ("32-true", "sgd-momentum"): (4 * N, 4 * N, 4 * N),
    ("32-true", "adafactor"): (4 * N, 4 * N, 4 * (1000 + 1000) + 4),
    ("32-true", "adamw8bit"): (4 * N, 4 * N, 2 * (N + 4 * -(-N // 256) + 1024)),
    ("bf16-true", "adamw"): (2 * N, 2 * N, 4 * N + 4),
    ("bf16-true", "adam"): (2 * N, 2 * N, 4 * N + 4),
    ("bf16-true", "sgd-momentum"): (2 * N, 2 * N, 2 * N),
    ("bf16-mixed", "adamw"): (2 * N, 2 * N, 8 * N + 4 + 4 * N),
    ("bf16-mixed", "sgd"): (2 * N, 2 * N, 4 * N),
    ("bf16-mixed", "adafactor"): (2 * N, 2 * N, 4 * 2000 + 4 + 4 * N),
    ("fp16-mixed", "adamw"): (2 * N, 2 * N, 8 * N + 4 + 4 * N),
    ("fp16-mixed", "adamw8bit"): (2 * N, 2 * N, 2 * (N + 4 * -(-N // 256) + 1024) + 4 * N),
}


@pytest.mark.parametrize("precision, optimizer", list(TABLE))
def test_model_states_equal_a_hand_count(precision, optimizer):
    states = model_states(N, TrainingSetup(seq_len=1, precision=precision, optimizer=optimizer), SHAPES)
    assert (states.param_bytes, states.grad_bytes, states.optimizer_bytes) == TABLE[precision, optimizer]


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 96, dtype=dtype)), torch.nn.Parameter(torch.randn(96, dtype=dtype)),
            torch.nn.Parameter(torch.randn(4, 8, 16, dtype=dtype))]


def _bnb():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps),
    "adamw-bf16": lambda ps: torch.optim.AdamW(ps),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, amsgrad=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adafactor": lambda ps: torch.optim.Adafactor(ps),
    "adamw8bit": lambda ps: _bnb()(ps),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_live_optimizers_states_are_read_before_its_first_step_as_they_are_after(name):
    """bitsandbytes' 8-bit AdamW runs on this CPU, so it is checked like the torch optimizers."""
    params = _params(torch.bfloat16 if name == "adamw-bf16" else torch.float32)
    if name == "adamw8bit":
        params = [torch.nn.Parameter(torch.randn(128, 64)), torch.nn.Parameter(torch.randn(32))]
    opt = OPTIMIZERS[name](params)
    before = live_optimizer_states(opt)[0]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    after = sum({id(v.untyped_storage()): v.untyped_storage().nbytes() for p in params for v in opt.state[p].values()
                 if torch.is_tensor(v)}.values())
    assert before == after == live_optimizer_states(opt)[0]


def test_optimize_reads_the_live_optimizer_and_counts_gradients_as_they_appear():
    model = hf_causal_lm("llama", num_hidden_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = memopt.optimize(model, hf_sample(seq=128), 1.0, optimizer=opt)
    graph = handle.graph
    handle.remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert graph.optimizer_bytes == params, "SGD with momentum: one buffer per parameter"
    assert not graph.grads_resident and graph.grad_bytes_at("forward") == 0
    assert 0 < graph.grad_bytes_at("backward", len(graph.units) - 1) < graph.grad_bytes_at("step") == graph.grad_bytes
    assert graph.head_grad_bytes > 0 and graph.other_grad_bytes > 0  # the LM head first, the embeddings last


def test_unknown_optimizers_are_read_after_a_step_or_named():
    class Mine(torch.optim.SGD):
        pass

    params = _params()
    opt = Mine(params, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Mine before its first step"):
        live_optimizer_states(opt)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert live_optimizer_states(opt)[0] == sum(p.numel() * 4 for p in params)


def test_bad_precision_and_optimizer_names_are_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        memopt.MemoptConfig(precision="bf16")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        memopt.MemoptConfig(optimizer="lion")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optimizer_state_bytes("lion", SHAPES, 4)
