"""`memopt plan` over every causal-LM architecture transformers ships: it plans, or says in one line why not.

Each architecture's default config is written as a config.json a user would pass, made small where depth
costs time: 2 layers (plus the first layer of each kind a per-layer list names), 4 experts choosing 2,
a 512-token vocabulary. Widths stay as they are: fake tensors allocate nothing, and shrinking widths
generically breaks the relations some configs hold (MLA's key heads equal its query heads, Mamba-2's
hidden x expand equals heads x head dim, rotary dims within the head dim).

``CANNOT_PLAN`` lists the architectures that fail and why; a new failure, a failure for another reason,
or one that starts to plan fails the test, so the list stays true. A representative subset runs by
default; the whole walk is ``-m slow``.
"""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from memopt.cli import main  # noqa: E402

ALL = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

_TRANSFORMERS_DEFAULT = "transformers' default config lacks a value its model needs"
_FAKE = "a limit of tracing without weights"
_SHRINK = "its layer count is tied to other fields, so the 2-layer shrink is not a valid config"

#: model_type -> (what memopt's one-line error says, why), for transformers 5.24.
CANNOT_PLAN: dict[str, tuple[str, str]] = {
    "blt": ("reads a tensor's value", _FAKE),
    "jetmoe": ("reads a tensor's value", _FAKE),
    "xlm": ("reads a tensor's value", _FAKE),
    "longcat_flash": ("shape depends on values (aten.nonzero", _FAKE),
    "deepseek_v4": ("converts a submodule with .to()", _FAKE),
    "hy_v4": ("converts a submodule with .to()", _FAKE),
    "inkling_text": ("converts a submodule with .to()", _FAKE),
    "inkling2_text": ("converts a submodule with .to()", _FAKE),
    "inkling2_loop_text": ("converts a submodule with .to()", _FAKE),
    "cohere_compass_text": ("malformed: KeyError: 'full_attention'", _TRANSFORMERS_DEFAULT),
    "dbrx": ("malformed: AttributeError: 'DbrxAttentionConfig' object has no attribute 'rope_theta'",
             _TRANSFORMERS_DEFAULT),
    "dots1": ("malformed: TypeError: empty()", _TRANSFORMERS_DEFAULT),
    "hunyuan_v1_dense": ("malformed: TypeError: unsupported operand", _TRANSFORMERS_DEFAULT),
    "hunyuan_v1_moe": ("malformed: TypeError: unsupported operand", _TRANSFORMERS_DEFAULT),
    "ministral": ("malformed: TypeError: unsupported operand", _TRANSFORMERS_DEFAULT),
    "nemotron": ("malformed: TypeError: unsupported operand", _TRANSFORMERS_DEFAULT),
    "qwen4_exp": ("malformed: TypeError: unsupported operand", _TRANSFORMERS_DEFAULT),
    "qwen4_exp_text": ("malformed: TypeError: unsupported operand", _TRANSFORMERS_DEFAULT),
    "lfm2_moe": ("malformed: TypeError: 'NoneType' object is not subscriptable", _TRANSFORMERS_DEFAULT),
    "musicgen": ("malformed: AttributeError: 'MusicgenConfig' object has no attribute 'dropout'",
                 "a text-to-audio composite: its causal LM is the decoder, its config has no decoder fields"),
    "musicgen_melody": ("malformed: AttributeError: 'MusicgenMelodyConfig' object has no attribute 'dropout'",
                        "a text-to-audio composite: its causal LM is the decoder, its config has no decoder fields"),
    "reformer": ("is_decoder=True", "its causal LM needs is_decoder=True, which the default config leaves off"),
    "deepseek_v2": ("topk(): argument 'k' must be int, not NoneType", "the default config has no num_experts_per_tok"),
    "gemma3n": ("requires the PIL library", "its vision tower needs Pillow, which memopt does not install"),
    "git": ("Expected input batch_size (0)", "an image-to-text model: its LM head needs pixel_values"),
    "xmod": ("Input language unknown", "its adapters need a language chosen before the first call"),
    "xlnet": ("expected scalar type", "its bf16 forward mixes dtypes; it plans with --dtype fp32"),
    "xlstm": ("expected scalar type", "its bf16 forward mixes dtypes; it plans with --dtype fp32"),
    "gemma4_unified_assistant": ("producing a cache is different", "a speculative-decoding assistant: " + _SHRINK),
    "gemma3n_text": ("producing a cache is different", _SHRINK),
    "dory": ("n_input_layers + n_recurrent_layers + n_output_layers must equal num_hidden_layers", _SHRINK),
    "zamba": ("tie_weights_keys", _SHRINK),
    "zamba2": ("KeyError: 2", _SHRINK),
}

#: Architectures whose default config transformers itself cannot construct (nothing for memopt to load).
NO_DEFAULT_CONFIG = {"gemma4_assistant": "its default hidden_size_per_layer_input fails its own validation"}

#: The default run: the families users plan most, each kind of block (dense, MoE, MLA, SSM, hybrid,
#: encoder-as-decoder, multimodal wrappers) and each kind of failure.
SUBSET = sorted({
    "llama", "gpt2", "gemma2", "qwen2", "mistral", "phi3", "gpt_neox", "opt", "bloom", "falcon", "qwen2_moe",
    "deepseek_v3", "mamba", "gemma3", "mllama", "bert", "bart", "jetmoe", "inkling_text", "nemotron", "git",
    "gemma4_assistant",
})

_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
           "num_decoder_layers", "num_blocks")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "num_selected_experts", "moe_k")
_VOCAB = 512


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_layer(key: str, value, layers: int) -> bool:
    return isinstance(value, list) and len(value) == layers and key != "architectures"


def _kept_layers(config: dict, layers: int) -> list[int]:
    """The first two layers and the first of each kind a per-layer list (of at most 4 kinds) names."""
    keep = {0, 1}
    for key, value in config.items():
        kinds = [repr(v) for v in value] if _per_layer(key, value, layers) else []
        if 0 < len(set(kinds)) <= 4:
            keep.update(kinds.index(kind) for kind in set(kinds))
    return sorted(i for i in keep if i < layers)


def _shrink(config: dict) -> dict:
    """``config`` with fewer layers, experts and tokens; sub-configs (text, vision) likewise."""
    out = dict(config)
    for keys, small in ((_EXPERTS, 4), (_TOP_K, 2), (("vocab_size", "decoder_vocab_size"), _VOCAB)):
        for key in keys:
            if _is_count(config.get(key)) and config[key] > small:
                out[key] = small
    if any(key in out and out[key] != config[key] for key in _EXPERTS):
        for key in ("n_group", "topk_group", "num_expert_group"):  # expert groups cannot outnumber experts
            if _is_count(config.get(key)) and config[key] > 1:
                out[key] = 1
    if out.get("vocab_size") != config.get("vocab_size"):
        for key, value in config.items():
            if key.endswith("token_id") and _is_count(value) and value >= _VOCAB:
                out[key] = 1
    layers = next((config[key] for key in _LAYERS if _is_count(config.get(key))), None)
    if layers:
        kept = _kept_layers(config, layers)
        for key, value in config.items():
            if key in _LAYERS and value == layers:
                out[key] = len(kept)
            elif _per_layer(key, value, layers):
                out[key] = [value[i] for i in kept]
            elif isinstance(value, dict) and value and all(str(i).isdigit() for i in value):  # {layer index: ...}
                out[key] = {str(kept.index(int(i))): v for i, v in value.items() if int(i) in kept}
    for key, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = _shrink(value)
    return out


def _plan(model_type: str, tmp_path, capsys) -> tuple[int, str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**_shrink(CONFIG_MAPPING[model_type]().to_dict()), "model_type": model_type}))
    # 1 TiB: a 2-layer model at full width can hold more states than an H100, which is not what this checks.
    code = main(["plan", str(path), "--seq", "64", "--gpu-memory", "1TiB", "--quiet"])
    captured = capsys.readouterr()
    return code, captured.err


def _check(model_type: str, tmp_path, capsys) -> None:
    if model_type in NO_DEFAULT_CONFIG:
        with pytest.raises(Exception):  # noqa: B017 - transformers' own validation error, whatever its type
            CONFIG_MAPPING[model_type]()
        return
    code, err = _plan(model_type, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    if model_type not in CANNOT_PLAN:
        assert code == 0, f"{model_type} no longer plans: {err.strip()}"
        return
    needle, why = CANNOT_PLAN[model_type]
    assert code != 0, f"{model_type} plans now ({why} no longer holds): remove it from CANNOT_PLAN"
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("memopt plan: error: ") and needle in lines[0], (model_type, lines[0])


@pytest.mark.parametrize("model_type", SUBSET)
def test_architecture_plans_or_says_why(model_type, tmp_path, capsys):
    _check(model_type, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [m for m in ALL if m not in SUBSET])
def test_every_architecture_plans_or_says_why(model_type, tmp_path, capsys):
    _check(model_type, tmp_path, capsys)


def test_the_lists_name_only_architectures_transformers_ships():
    assert set(CANNOT_PLAN) | set(NO_DEFAULT_CONFIG) | set(SUBSET) <= set(ALL)
    # Most of them plan: the list is the exception.
    assert len(CANNOT_PLAN) + len(NO_DEFAULT_CONFIG) < len(ALL) / 4


def test_gemma2_plans_with_eager_attention_and_says_so(tmp_path, capsys):
    """Gemma-2 has no sdpa in transformers; the plan picks eager, the report and the graph name it."""
    config = {"model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024}
    path = tmp_path / "gemma2.json"
    path.write_text(json.dumps(config))
    out_json = tmp_path / "plan.json"
    assert main(["plan", str(path), "--seq", "128", "--quiet", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "eager attention" in out.splitlines()[0]
    assert json.loads(out_json.read_text())["graph"]["meta"]["attn_implementation"] == "eager"
    # Asking for sdpa names the fix.
    assert main(["plan", str(path), "--seq", "128", "--quiet", "--attn-impl", "sdpa"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Gemma2ForCausalLM does not support attention 'sdpa'" in err and "--attn-impl eager" in err
