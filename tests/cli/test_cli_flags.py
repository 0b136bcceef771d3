"""How the CLI reads flags: dashes, bare booleans, repeated list options, repeated scalars."""

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
