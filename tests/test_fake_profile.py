"""Fake profile: the live walk on fake tensors matches the live profile; model states match the analytic counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memopt.config import MemoptConfig  # noqa: E402
from memopt.fake_profile import (  # noqa: E402
    ModelConfigError,
    TrainingSetup,
    analytic_param_count,
    attention_implementation,
    fake_profile,
    load_model_config,
    model_states,
    parameter_count,
    preset_names,
    resharded,
)
from memopt.hardware import Hardware  # noqa: E402
from memopt.planners import baseline_plan  # noqa: E402
from memopt.profiler import profile_model  # noqa: E402
from memopt.testing import HF_FAMILIES, hf_causal_lm, hf_sample  # noqa: E402

CPU = Hardware.preset("cpu")


def _activation_bytes(graph) -> int:
    """Everything a step holds for backward with nothing saved, plus the head's transient."""
    return graph.activation_bytes + graph.head_workspace_bytes


def _activation_peak(graph) -> int:
    return baseline_plan(graph, "none").predicted_peak_bytes - graph.model_state_bytes


# (family, seq, dtype): several architectures, two sequence lengths, one half-precision case.
CASES = [
    ("llama", 64, "fp32"), ("llama", 128, "fp32"),
    ("gpt2", 64, "fp32"), ("gpt2", 128, "fp32"),
    ("qwen2", 128, "fp32"), ("mistral", 64, "fp32"),
    ("gpt_neox", 128, "fp32"), ("opt", 64, "fp32"),
    ("llama", 128, "bf16"),
]


@pytest.mark.parametrize("family,seq,dtype", CASES)
def test_fake_activations_within_10_percent_of_live(family, seq, dtype):
    config_name, kwargs = HF_FAMILIES[family]
    hf_config = getattr(transformers, config_name)(**kwargs)
    batch = 2
    fake = fake_profile(hf_config, TrainingSetup(seq_len=seq, batch_size=batch, dtype=dtype), CPU)

    model = hf_causal_lm(family, attn_implementation="sdpa")
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    live = profile_model(model, hf_sample(batch=batch, seq=seq), MemoptConfig(probe_separable=False), CPU)

    assert [u.name for u in fake.units] == [u.name for u in live.units]
    for fake_value, live_value in ((_activation_bytes(fake), _activation_bytes(live)),
                                   (_activation_peak(fake), _activation_peak(live))):
        assert live_value > 0
        assert abs(fake_value - live_value) <= 0.10 * live_value, (family, seq, fake_value, live_value)
    # Per unit, too: the largest unit's saved bytes agree.
    fake_unit = max(u.saved_bytes for u in fake.units)
    live_unit = max(u.saved_bytes for u in live.units)
    assert abs(fake_unit - live_unit) <= 0.10 * live_unit


PUBLISHED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-xl": 1_557_611_200,
    "llama-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
}


def test_every_required_preset_ships():
    assert set(PUBLISHED_PARAMS) <= set(preset_names())


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count_is_analytic(preset):
    hf_config = load_model_config(preset)
    assert analytic_param_count(hf_config) == PUBLISHED_PARAMS[preset]
    assert parameter_count(preset) == PUBLISHED_PARAMS[preset]


# (dtype, optimizer, stage, world, bytes per param: params, grads, optimizer)
STATE_CASES = [
    ("bf16", "adamw", 0, 1, (2, 2, 12)),
    ("fp16", "adamw", 0, 1, (2, 2, 12)),
    ("fp32", "adamw", 0, 1, (4, 4, 8)),
    ("bf16", "sgd", 0, 1, (2, 2, 4)),
    ("fp32", "sgd", 0, 1, (4, 4, 0)),
    ("fp32", "sgd-momentum", 0, 1, (4, 4, 4)),
    ("bf16", "adamw", 1, 4, (2, 2, 3)),
    ("bf16", "adamw", 2, 4, (2, 0.5, 3)),
    ("bf16", "adamw", 3, 4, (0.5, 0.5, 3)),
]


@pytest.mark.parametrize("dtype,optimizer,stage,world,per_param", STATE_CASES)
def test_model_states_follow_the_convention(dtype, optimizer, stage, world, per_param):
    n = 1_000_000
    states = model_states(n, TrainingSetup(seq_len=8, dtype=dtype, optimizer=optimizer, zero_stage=stage,
                                           world_size=world))
    step_count = 4 if optimizer == "adamw" else 0  # Adam's 0-d fp32 step, one for this one tensor
    sharded = world if stage >= 1 else 1
    expected = (int(per_param[0] * n), int(per_param[1] * n), -(-(int(per_param[2] * n * sharded) + step_count) // sharded))
    assert (states.param_bytes, states.grad_bytes, states.optimizer_bytes) == expected
    assert optimizer in states.convention


def test_fake_profile_model_states_equal_analytic_counts():
    setup = TrainingSetup(seq_len=64, batch_size=1, dtype="bf16", optimizer="adamw", zero_stage=3, world_size=8)
    graph = fake_profile("gpt2", setup, Hardware.preset("h100"))
    n = PUBLISHED_PARAMS["gpt2"]
    assert graph.meta["n_params"] == n
    assert graph.param_bytes == -(-2 * n // 8)
    assert graph.grad_bytes == -(-2 * n // 8)
    tensors = 2 + 12 * 12 + 2  # wte, wpe, 12 blocks x 12, ln_f (lm_head tied): one 4-byte Adam step each
    assert graph.optimizer_bytes == -(-(12 * n + 4 * tensors) // 8)
    assert graph.sharding_degree == 8
    assert graph.meta["profiled"] == "fake"
    # Under DeepSpeed's default reuse distance (1e9 parameters) ZeRO-3 keeps a model this small gathered whole.
    assert graph.gathered_param_bytes == 2 * n - graph.param_bytes
    assert graph.resident_bytes == graph.model_state_bytes + graph.gathered_param_bytes


def test_fake_times_come_from_the_roofline_of_the_gpu():
    setup = TrainingSetup(seq_len=256, batch_size=1)
    # A slow part, so the per-kernel floor is negligible and times scale with the throughputs.
    base = Hardware.preset("cpu")
    fast = fake_profile("gpt2", setup, base)
    slow_hw = dataclasses.replace(base, name="cpu/4", peak_flops_per_s=base.peak_flops_per_s / 4,
                                  mem_bytes_per_s=base.mem_bytes_per_s / 4)
    slow = fake_profile("gpt2", setup, slow_hw)
    for f, s in zip(fast.units, slow.units):
        assert f.forward_s > 0 and f.backward_s > f.forward_s
        assert s.forward_s / f.forward_s == pytest.approx(4.0, rel=0.02)
        assert s.backward_s / f.backward_s == pytest.approx(4.0, rel=0.02)
    # Memory does not depend on the GPU's speed.
    assert [u.saved_bytes for u in fast.units] == [u.saved_bytes for u in slow.units]
    # Forward and backward of a transformer: about 6 FLOPs per parameter and token, plus recompute.
    assert fast.meta["modelled_flops"] > 6 * PUBLISHED_PARAMS["gpt2"] * 256 * 0.9


def test_sequence_beyond_learned_positions_is_rejected():
    with pytest.raises(ModelConfigError, match="position"):
        fake_profile("gpt2", TrainingSetup(seq_len=2048), Hardware.preset("h100"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=0), "seq_len"),
    (dict(seq_len=8, dtype="int8"), "dtype"),
    (dict(seq_len=8, optimizer="lion"), "optimizer"),
    (dict(seq_len=8, zero_stage=4, world_size=2), "zero_stage"),
    (dict(seq_len=8, zero_stage=2), "world_size"),
])
def test_training_setup_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingSetup(**kwargs)


GEMMA2 = {"model_type": "gemma2", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}


@pytest.mark.parametrize("config,requested,expected", [
    (TINY_LLAMA, None, "sdpa"), (TINY_LLAMA, "eager", "eager"), (TINY_LLAMA, "sdpa", "sdpa"),
    (GEMMA2, None, "eager"), (GEMMA2, "eager", "eager"),  # transformers' Gemma-2 has no sdpa path
])
def test_attention_follows_what_the_model_class_supports(config, requested, expected):
    assert attention_implementation(config, requested) == expected


@pytest.mark.parametrize("config,requested,match", [
    (GEMMA2, "sdpa", "Gemma2ForCausalLM does not support attention 'sdpa'.*--attn-impl eager"),
    (TINY_LLAMA, "flash_attention_2", "'flash_attention_2' is not one memopt can trace; choose sdpa or eager"),
])
def test_attention_the_model_cannot_run_is_refused_with_the_fix(config, requested, match):
    with pytest.raises(ModelConfigError, match=match):
        fake_profile(config, TrainingSetup(seq_len=64), CPU, attn_implementation=requested)


def test_gemma2_profiles_and_counts_with_eager_attention():
    graph = fake_profile(GEMMA2, TrainingSetup(seq_len=64), CPU)
    assert graph.meta["attn_implementation"] == "eager"
    assert graph.meta["n_params"] == parameter_count(GEMMA2) > 0


def test_eager_attention_is_modelled_when_asked():
    """Eager attention saves the (heads x seq x seq) probabilities that sdpa never materialises."""
    setup = TrainingSetup(seq_len=256, dtype="fp32")
    sdpa = fake_profile(TINY_LLAMA, setup, CPU)
    eager = fake_profile(TINY_LLAMA, setup, CPU, attn_implementation="eager")
    assert (sdpa.meta["attn_implementation"], eager.meta["attn_implementation"]) == ("sdpa", "eager")
    probabilities = 4 * 256 * 256 * 4  # heads x seq x seq, fp32, per layer
    assert eager.activation_bytes - sdpa.activation_bytes >= 2 * probabilities


def test_config_the_class_validation_rejects_is_one_line():
    """Config classes validate themselves with their own error types; memopt reports them, never a traceback."""
    bad = {"model_type": "mamba2", "hidden_size": 64, "expand": 2, "num_heads": 4, "head_dim": 16}
    with pytest.raises(ModelConfigError, match=r"malformed: .*hidden_size \* expand \(128\) must equal") as info:
        load_model_config(bad)
    assert "\n" not in str(info.value)


def test_config_object_changed_into_an_invalid_one_is_one_line():
    """A PretrainedConfig edited after construction is re-validated when the model is built: still one line."""
    config = load_model_config({"model_type": "mamba2", "hidden_size": 64, "expand": 2, "num_heads": 8,
                                "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 256})
    config.num_heads = 4  # 64 x 2 != 4 x 16
    with pytest.raises(ModelConfigError, match="malformed: .*must equal num_heads \\* head_dim"):
        fake_profile(config, TrainingSetup(seq_len=64), CPU)


@pytest.mark.parametrize("stage,world", [(1, 4), (2, 8), (3, 8)])
def test_resharded_equals_profiling_under_that_sharding(stage, world):
    hardware = Hardware.preset("h100")
    whole = fake_profile("gpt2", TrainingSetup(seq_len=64, optimizer="adamw"), hardware)
    direct = fake_profile("gpt2", TrainingSetup(seq_len=64, optimizer="adamw", zero_stage=stage, world_size=world),
                          hardware)
    again = resharded(whole, stage, world)
    for field in ("param_bytes", "grad_bytes", "optimizer_bytes", "sharding_degree", "gathered_param_bytes",
                  "optimizer_step_bytes"):
        assert getattr(again, field) == getattr(direct, field), field
    assert again.optimizer_step_s == pytest.approx(direct.optimizer_step_s)
    assert resharded(again, 0, 1).model_state_bytes == whole.model_state_bytes


def test_resharded_refuses_graphs_it_cannot_reshard():
    graph = fake_profile("gpt2", TrainingSetup(seq_len=64), Hardware.preset("h100"))
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        resharded(graph, 4, 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        resharded(graph, 2, 0)
    stripped = dataclasses.replace(graph, meta={k: v for k, v in graph.meta.items() if k != "unsharded_states"})
    with pytest.raises(ValueError, match="unsharded_states"):
        resharded(stripped, 2, 2)
