"""`lmstack convert` end to end: a subprocess, as a user runs it."""

import json
import subprocess
import sys

import pytest
import torch
from hf_models import hf_model, token_ids

import lmstack


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_commands_and_defaults():
    from lmstack.cli import commands

    out = run_cli("--help")
    assert out.returncode == 0 and "convert" in out.stdout
    listing = out.stdout.split("Available subcommands:")[1].splitlines()
    for name in commands():  # every command has a one-line description beside its name
        line = next(line for line in listing if line.split()[:1] == [name])
        assert len(line.split()) > 1, f"`lmstack --help` lists {name!r} without a description"
    out = run_cli("convert", "--help")
    assert out.returncode == 0 and "default: 5GB" in out.stdout and "--config" in out.stdout


def test_convert_dtype_and_reshard(tmp_path):
    import transformers

    ref = hf_model("qwen2")
    ref.save_pretrained(tmp_path / "src")
    out = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16",
                  "--max-shard-size", "30KB")
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = lmstack.load(tmp_path / "dst")
    assert model.dtype == torch.bfloat16
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation="sdpa").eval()
    assert theirs.dtype == torch.bfloat16
    ids = token_ids((2, 8), seed=11)
    with torch.no_grad():
        expected, ours, bf16 = ref(ids).logits, model(ids).logits, theirs(ids).logits
    # the converted weights compute in lmstack what they compute in transformers (bit for bit: same ops)
    assert torch.equal(ours, bf16)
    err_ours, err_theirs = ((x.float() - expected).norm() / expected.norm() for x in (ours, bf16))
    assert err_ours <= 1.25 * err_theirs + 1e-3


def test_convert_preset_with_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("random_init: true\nseed: 3\n")
    out = run_cli("convert", "--config", str(tmp_path / "c.yaml"), "tiny-mixtral", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    out = run_cli("convert", str(tmp_path / "missing"), str(tmp_path / "o"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "is neither a model directory nor a preset" in out.stderr


@pytest.mark.parametrize("size, message", [("0", "max_shard_size 0 must be at least one byte"),
                                           ("1.2.3GB", "max_shard_size '1.2.3GB' is not a size like '5GB'")])
def test_a_bad_shard_size_fails_before_the_model_is_built(tmp_path, size, message):
    out = run_cli("convert", "tiny-llama", str(tmp_path / "o"), "--random_init", "true", "--max_shard_size", size)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()


def test_convert_carries_generation_config_through(tmp_path):
    """The source's stop-id list and sampling defaults survive, as transformers reads them."""
    import transformers

    ref = hf_model("llama", bos_token_id=0, eos_token_id=1)
    ref.generation_config = transformers.GenerationConfig(bos_token_id=0, eos_token_id=[1, 5], temperature=0.6,
                                                          top_p=0.9, do_sample=True)
    ref.save_pretrained(tmp_path / "src")
    out = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    src = transformers.GenerationConfig.from_pretrained(tmp_path / "src")
    dst = transformers.GenerationConfig.from_pretrained(tmp_path / "dst")
    for field in ("bos_token_id", "eos_token_id", "temperature", "top_p", "do_sample"):
        assert getattr(dst, field) == getattr(src, field), field
    assert dst.eos_token_id == [1, 5]


def test_convert_refuses_a_malformed_generation_config(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "generation_config.json").write_text("[1, 5]")
    out = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "dst"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "generation_config.json must hold a JSON object of generation settings, got list" in out.stderr


@pytest.mark.parametrize("shipped, ours, merged", [
    ({"eos_token_id": [1, 5], "top_p": 0.9}, {"eos_token_id": 1}, {"eos_token_id": [1, 5], "top_p": 0.9}),
    ({"eos_token_id": [5]}, {"eos_token_id": 1}, {"eos_token_id": [5, 1]}),
    ({"eos_token_id": 5}, {"eos_token_id": 1}, {"eos_token_id": [5, 1]}),
    ({"eos_token_id": 1}, {"eos_token_id": 1, "bos_token_id": 0}, {"eos_token_id": 1, "bos_token_id": 0}),
    ({"temperature": 0.6}, {"eos_token_id": [1, 2]}, {"temperature": 0.6, "eos_token_id": [1, 2]}),
])
def test_generation_config_merge_keeps_stop_ids(shipped, ours, merged):
    from lmstack.checkpoint.hf import merge_generation_config

    assert merge_generation_config(shipped, ours) == merged
