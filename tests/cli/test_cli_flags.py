"""How the CLI reads flags: dashes, bare booleans, repeated list options, repeated scalars, unknown names."""

import pytest

from lmstack.cli import normalize_flags
from lmstack.errors import LmstackError


def test_dashes_become_underscores():
    assert normalize_flags(["convert", "a", "b", "--max-shard-size", "2GB"]) == \
        ["convert", "a", "b", "--max_shard_size", "2GB"]
    assert normalize_flags(["convert", "a", "b", "--max-shard-size=2GB"]) == ["convert", "a", "b", "--max_shard_size=2GB"]


def test_bare_boolean_means_true_and_no_prefix_false():
    assert normalize_flags(["convert", "p", "o", "--random-init"]) == ["convert", "p", "o", "--random_init", "true"]
    assert normalize_flags(["convert", "p", "o", "--random-init", "--seed", "3"]) == \
        ["convert", "p", "o", "--random_init", "true", "--seed", "3"]
    assert normalize_flags(["convert", "p", "o", "--random-init", "false"]) == ["convert", "p", "o", "--random_init", "false"]
    assert normalize_flags(["convert", "p", "o", "--no-random-init"]) == ["convert", "p", "o", "--random_init", "false"]


def test_repeated_list_option_keeps_every_value():
    argv = ["data", "prepare", "--input", "a.txt", "--input", "b.txt", "--out", "d"]
    assert normalize_flags(argv) == ["data", "prepare", "--input+", "a.txt", "--input+", "b.txt", "--out", "d"]


def test_repeated_scalar_option_is_an_error():
    with pytest.raises(LmstackError, match="option --workers is given twice"):
        normalize_flags(["data", "prepare", "--workers", "1", "--workers", "2"])


def test_a_mistyped_option_is_named_with_the_closest_one():
    with pytest.raises(LmstackError, match=r"--vocab-szie is not an option of `lmstack tokenizer train`; "
                                           r"did you mean --vocab_size\?"):
        normalize_flags(["tokenizer", "train", "--input", "a.txt", "--vocab-szie", "500"])
    with pytest.raises(LmstackError, match=r"--max_stepz is not an option of `lmstack pretrain`; did you mean "
                                           r"--max_steps\?"):
        normalize_flags(["pretrain", "--max_stepz", "3"])
    # the parser's own options, list appends and --no-<bool> are still known
    assert normalize_flags(["generate", "--help"]) == ["generate", "--help"]
    assert normalize_flags(["generate", "--no-stream"]) == ["generate", "--stream", "false"]


def test_a_wrong_key_in_a_config_file_is_named(tmp_path):
    """jsonargparse reports it for two-word commands only as "error: 'data'"."""
    bad = tmp_path / "prepare.yaml"
    bad.write_text("inputt: corpus/\nout: runs/data\n")
    with pytest.raises(LmstackError, match=rf"--config {bad}: key 'inputt' is not an option of `lmstack data "
                                           r"prepare`; did you mean --input\?"):
        normalize_flags(["data", "prepare", "--config", str(bad)])
    good = tmp_path / "good.yaml"
    good.write_text("input: [corpus/]\nout: runs/data\n")
    assert normalize_flags(["data", "prepare", f"--config={good}"]) == ["data", "prepare", f"--config={good}"]


def test_a_value_that_starts_with_dashes_is_passed_through():
    """`--prompt "--help me"` is the prompt, not an option (argparse takes it as the value too)."""
    argv = ["generate", "m", "--prompt", "--help me please", "--max-new-tokens", "3"]
    assert normalize_flags(argv) == ["generate", "m", "--prompt", "--help me please", "--max_new_tokens", "3"]
    assert normalize_flags(["chat", "m", "--system", "--- title: x"]) == ["chat", "m", "--system", "--- title: x"]
    assert normalize_flags(["generate", "m", "--stream", "--prompt", "x"]) == \
        ["generate", "m", "--stream", "true", "--prompt", "x"]  # a bare boolean still takes no value
