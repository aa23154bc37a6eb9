"""`memopt` user errors: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from memopt.cli import main  # noqa: E402


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


PLAN = ["--seq", "128", "--quiet"]


def test_unknown_model_preset(capsys):
    code, _, err = _run(["plan", "llama-70q", *PLAN], capsys)
    line = _assert_one_line(err)
    assert code == 2
    assert "unknown model preset 'llama-70q'" in line and "llama-7b" in line and "config.json" in line


def test_unknown_gpu_preset(capsys):
    code, _, err = _run(["plan", "gpt2", "--gpu", "h1000", *PLAN], capsys)
    line = _assert_one_line(err)
    assert code == 2
    assert "unknown GPU preset 'h1000'" in line and "h100" in line


def test_missing_config_file(tmp_path, capsys):
    code, _, err = _run(["plan", str(tmp_path / "nope" / "config.json"), *PLAN], capsys)
    assert code == 2
    assert "no model config at" in _assert_one_line(err)


def test_malformed_json_config(tmp_path, capsys):
    path = _write(tmp_path, "config.json", '{"model_type": "llama", "hidden_size": 64,,}')
    code, _, err = _run(["plan", path, *PLAN], capsys)
    line = _assert_one_line(err)
    assert code == 2
    assert "not valid JSON" in line and "line 1" in line


def test_config_without_model_type(tmp_path, capsys):
    path = _write(tmp_path, "config.json", json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    code, _, err = _run(["plan", path, *PLAN], capsys)
    assert code == 2
    assert 'no "model_type"' in _assert_one_line(err)


def test_unknown_model_type(tmp_path, capsys):
    path = _write(tmp_path, "config.json", json.dumps({"model_type": "not-a-model", "hidden_size": 64}))
    code, _, err = _run(["plan", path, *PLAN], capsys)
    line = _assert_one_line(err)
    assert code == 2
    assert "does not know model_type 'not-a-model'" in line


def test_unsupported_model_type(tmp_path, capsys):
    # T5 is an encoder-decoder: transformers has no causal-LM class for it.
    _write(tmp_path, "config.json", json.dumps({"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 4,
                                                "d_kv": 16, "d_ff": 128, "vocab_size": 256}))
    # A folder holding a config.json is accepted like the file itself.
    code, _, err = _run(["plan", str(tmp_path), *PLAN], capsys)
    line = _assert_one_line(err)
    assert code == 2
    assert "'t5' is not supported" in line and "causal language models" in line


def test_malformed_config_values(tmp_path, capsys):
    # 60 is not divisible by 7 heads: the model cannot be built.
    path = _write(tmp_path, "config.json", json.dumps({"model_type": "gpt2", "n_embd": 60, "n_head": 7, "n_layer": 2,
                                                       "vocab_size": 256, "n_positions": 256}))
    code, _, err = _run(["plan", path, *PLAN], capsys)
    assert code == 2
    line = _assert_one_line(err)
    assert "malformed" in line and "divisible" in line


def test_budget_below_model_states_says_what_would_fit(capsys):
    # gpt2 in bf16 with AdamW: 16 B/param x 124 M = 1.85 GiB of model states.
    code, out, err = _run(["plan", "gpt2", "--budget", "1GiB", *PLAN], capsys)
    line = _assert_one_line(err)
    assert code == 2
    assert "below the model states" in line
    assert "1.85 GiB" in line  # how much the states need
    assert "step needs" in line  # how much the whole step needs
    assert "--zero-stage" in line and "--world-size" in line  # which ZeRO stage / world size fits
    assert "memory breakdown" in out  # the breakdown is still printed


def test_budget_below_activation_floor(capsys):
    # Above the model states, below what even full recompute needs.
    code, _, err = _run(["plan", "gpt2", "--budget", "1.9GiB", "--seq", "1024", "--batch", "8", "--quiet"], capsys)
    line = _assert_one_line(err)
    assert code == 2
    assert "needs" in line and "GiB" in line


def _one_less(value: str) -> str:
    """A --budget value one hundredth of its unit below ``value`` (e.g. 2.07GiB -> 2.06GiB)."""
    number, unit = re.fullmatch(r"(\d+\.\d\d)([KMG]iB)", value).groups()
    return f"{float(number) - 0.01:.2f}{unit}"


def _suggestion(line: str, pattern: str) -> str:
    match = re.search(pattern, line)
    assert match, (pattern, line)
    return match.group(1)


def _plans(argv, capsys) -> int:
    code = main(argv)
    capsys.readouterr()
    return code


@pytest.mark.parametrize("argv,head", [
    (["--budget", "1GiB", *PLAN], "is below the model states"),
    (["--budget", "1.9GiB", "--seq", "1024", "--batch", "8", "--quiet"], "no plan fits budget 1.9GiB"),  # no ZeRO fits
])
def test_suggested_minimum_budget_works_as_written(argv, head, capsys):
    """The suggested value is one argv item --budget accepts, rounded up: it fits, a hundredth less does not."""
    code, _, err = _run(["plan", "gpt2", *argv], capsys)
    assert code == 2
    line = _assert_one_line(err)
    assert head in line
    value = _suggestion(line, r"(?:Raise --budget to at least|or with --budget) (\S+)")
    assert re.fullmatch(r"\d+\.\d\d[KMG]iB", value), value  # no space: "--budget 58.52 GiB" is two arguments
    assert f"needs at least {value}" in line or f"step needs {value}" in line  # the head quotes the same figure
    shape = argv[2:]
    assert _plans(["plan", "gpt2", "--budget", value, *shape], capsys) == 0
    assert _plans(["plan", "gpt2", "--budget", _one_less(value), *shape], capsys) == 2


def test_suggested_zero_sharding_works_as_written(capsys):
    code, _, err = _run(["plan", "gpt2", "--budget", "1GiB", *PLAN], capsys)
    assert code == 2
    line = _assert_one_line(err)
    flags = _suggestion(line, r"\((--zero-stage \d --world-size \d+), needs --budget \S+ or more\)").split()
    value = _suggestion(line, r"--world-size \d+, needs --budget (\S+) or more\)")
    assert _plans(["plan", "gpt2", *flags, "--budget", value, *PLAN], capsys) == 0
    assert _plans(["plan", "gpt2", *flags, "--budget", _one_less(value), *PLAN], capsys) == 2


@pytest.mark.parametrize("argv,needle", [
    (["plan", "gpt2", "--seq", "128", "--budget", "lots"], "is not a byte count"),
    (["plan", "gpt2", "--seq", "128", "--budget", "150%"], "'150%' is not a percentage in (0, 100]"),
    (["plan", "gpt2", "--seq", "128", "--budget", "0"], "must be positive, got '0'"),
    (["plan", "gpt2", "--seq", "128", "--budget", "1.5"], "--budget 1.5 is neither a fraction in (0, 1] nor a whole number"),
    (["plan", "gpt2", "--seq", "128", "--dtype", "int4"], "invalid choice"),
    (["plan", "gpt2", "--seq", "128", "--attn-impl", "flash_attention_2"], "invalid choice: 'flash_attention_2'"),
    (["plan", "gpt2", "--seq", "0", "--quiet"], "seq_len must be an int >= 1"),
    (["plan", "gpt2", "--seq", "128", "--zero-stage", "3", "--quiet"], "world_size"),
    (["plan", "gpt2", "--seq", "4096", "--quiet"], "learned position table"),
    (["plan", "gpt2"], "--seq"),
    (["report"], "path"),
])
def test_bad_arguments(argv, needle, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert needle in _assert_one_line(err)


def test_report_of_a_file_that_is_not_a_plan(tmp_path, capsys):
    path = _write(tmp_path, "other.json", json.dumps({"hello": 1}))
    code, _, err = _run(["report", path], capsys)
    assert code == 2
    assert "not a memopt plan report" in _assert_one_line(err)


def test_console_entry_point_exit_code():
    result = subprocess.run([sys.executable, "-m", "memopt.cli", "plan", "no-such-model", "--seq", "8", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown model preset" in result.stderr and "Traceback" not in result.stderr
