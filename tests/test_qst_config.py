"""QSTConfig validation, JSON round trip, and that ``import memopt.qst`` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from memopt.qst import QSTConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, r"r must be a positive int, got 0"),
        ({"r": 2.5}, r"r must be a positive int, got 2.5"),
        ({"r": True}, r"r must be a positive int, got True"),
        ({"downsample": "conv"}, r"downsample must be one of .* got 'conv'"),
        ({"adapter_rank": -1}, r"adapter_rank must be a positive int, got -1"),
        ({"quantize": "int8"}, r"quantize must be 'nf4' or None, got 'int8'; pass None"),
        ({"double_quant": "yes"}, r"double_quant must be True or False, got 'yes'"),
        ({"compute_dtype": "float64"}, r"compute_dtype must be one of .* got 'float64'; None follows the backbone"),
        ({"side_dtype": torch.int8}, r"side_dtype must be one of .* got torch.int8; None follows the backbone"),
        ({"downsample_norm": 1}, r"downsample_norm must be True or False, got 1; True \(the default\) ends"),
        ({"layers": []}, r"non-empty list .* got \[\]; pass None"),
        ({"layers": [0, -1]}, r"non-negative layer indices, got \[0, -1\]"),
        ({"layers": [1, 1]}, r"lists an index twice: \[1, 1\]"),
        ({"layers": "0,1"}, r"list of layer indices, got '0,1'"),
        ({"side_lora_rank": 0}, r"side_lora_rank must be a positive int, got 0"),
        ({"side_lora_alpha": 0}, r"side_lora_alpha must be a positive number, got 0"),
    ],
)
def test_bad_values_are_rejected_with_the_value_and_a_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSTConfig(**kwargs)


def test_defaults_follow_the_paper():
    config = QSTConfig()
    assert (config.r, config.downsample, config.adapter_rank) == (16, "adapter", 16)
    assert (config.quantize, config.double_quant, config.layers) == ("nf4", True, None)
    # The authors' adapter ends in a LayerNorm; their side network computes in the backbone's dtype.
    assert (config.downsample_norm, config.side_dtype) == (True, None)


def test_dtype_objects_are_stored_by_name_and_layers_sorted():
    config = QSTConfig(compute_dtype=torch.bfloat16, side_dtype=torch.float32, layers=[3, 0, 1])
    assert (config.compute_dtype, config.side_dtype) == ("bfloat16", "float32")
    assert config.layers == [0, 1, 3]


def test_side_width_names_divisors_when_r_does_not_divide():
    assert QSTConfig(r=16).side_width(2048) == 128
    with pytest.raises(ValueError, match=r"r=16 does not divide the backbone's hidden size 40; pick r among .*8"):
        QSTConfig(r=16).side_width(40)


def test_json_round_trip_and_unknown_keys():
    config = QSTConfig(r=8, downsample="maxpool", compute_dtype="float16", side_dtype="bfloat16", downsample_norm=False,
                       layers=[0, 2], side_lora_rank=4)
    again = QSTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match=r"unknown QSTConfig keys \['rank'\]"):
        QSTConfig.from_dict({"rank": 4})


def test_import_memopt_qst_pulls_in_nothing_heavy():
    code = (
        "import sys, memopt.qst, memopt.qst.testing;"
        "heavy = [m for m in ('transformers', 'peft', 'bitsandbytes', 'pulp', 'deepspeed') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
