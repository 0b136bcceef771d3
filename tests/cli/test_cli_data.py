"""`lmstack tokenizer train` and `lmstack data prepare` end to end, as a user runs them."""

import json
import subprocess
import sys

from corpus_helpers import stdlib_files

from lmstack.data import TokenDataset
from lmstack.tokenizer import Tokenizer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True)


def test_train_tokenizer_then_prepare(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in stdlib_files(6):
        (src / p.name).write_text(p.read_text())
    (src / "extra.jsonl").write_text('{"text": "hello world"}\n{"body": 1}\n{"text": "hello world"}\n{"text": "hi"}\n')
    out = run_cli("tokenizer", "train", "--input", str(src / "*.py"), "--out", str(tmp_path / "tok"),
                  "--vocab-size", "500")
    assert out.returncode == 0, out.stderr
    assert "vocab 505 (500 learned + special tokens)" in out.stdout
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.eos_token_id == 501 and tok.chat_template

    out = run_cli("data", "prepare", "--input", str(src), "--tokenizer", str(tmp_path / "tok"),
                  "--out", str(tmp_path / "data"), "--val-fraction", "0.2", "--workers", "1")
    assert out.returncode == 2 and "extra.jsonl:2: missing field 'text'" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("data", "prepare", "--input", f"[{src}]", "--tokenizer", str(tmp_path / "tok"),
                  "--out", str(tmp_path / "data"), "--val-fraction", "0.2", "--workers", "1", "--skip-bad", "true",
                  "--min-chars", "5")
    assert out.returncode == 0, out.stderr
    assert "skipped 1 bad records" in out.stdout and "exact duplicates" in out.stdout
    assert "filter min_chars                    1 documents              2 bytes" in out.stdout
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["cleaning"]["exact_duplicates"]["documents"] == 1 and report["bad_records"] == 1
    ds = TokenDataset(tmp_path / "data", 32)
    assert ds.vocab_size == 505 and ds.next_batch(2)[0].shape == (2, 32)


def test_help_and_missing_flags():
    out = run_cli("data", "prepare", "--help")
    assert out.returncode == 0 and "default: 0.005" in out.stdout and "--near_dedup" in out.stdout
    assert run_cli("tokenizer", "train", "--help").returncode == 0
    out = run_cli("data", "prepare", "--tokenizer", "x", "--out", "y")
    assert out.returncode == 2 and "--input is required" in out.stderr


def test_lone_surrogate_record_is_a_bad_record_naming_file_and_line(tmp_path):
    """A JSON "\\ud800" escape decodes to text UTF-8 cannot encode: once a bare UnicodeEncodeError."""
    from corpus_helpers import trained_tokenizer

    trained_tokenizer().save(tmp_path / "tok")
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "good document one"}\n{"text": "bad \\ud800 surrogate"}\n{"text": "good two"}\n')
    expected = f"{src}:2: field 'text' holds a lone surrogate '\\ud800' at character 4"
    prepare = ("data", "prepare", "--input", str(src), "--tokenizer", str(tmp_path / "tok"), "--workers", "1",
               "--val-fraction", "0")
    out = run_cli(*prepare, "--out", str(tmp_path / "a"))
    assert out.returncode == 2 and expected in out.stderr and "--skip-bad" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli(*prepare, "--out", str(tmp_path / "b"), "--skip-bad", "true")
    assert out.returncode == 0, out.stderr
    assert "skipped 1 bad records" in out.stdout
    assert json.loads((tmp_path / "b" / "index.json").read_text())["splits"]["train"]["num_documents"] == 2
    out = run_cli("tokenizer", "train", "--input", str(src), "--out", str(tmp_path / "t"), "--vocab-size", "300")
    assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = run_cli("tokenizer", "train", "--input", str(src), "--out", str(tmp_path / "t"), "--vocab-size", "300",
                  "--skip-bad", "true")
    assert out.returncode == 0 and "1 bad records skipped" in out.stdout, out.stderr


def test_negative_or_non_finite_max_bytes_is_refused():
    import pytest

    from lmstack.cli.data import _parse_size
    from lmstack.errors import ConfigError

    for bad in ("-1", "-5MB", "nan", "inf"):
        with pytest.raises(ConfigError, match=rf"--max-bytes '{bad}' must be a size >= 0 like 500MB"):
            _parse_size(bad)
    assert _parse_size("0") == 0 and _parse_size("1.5KB") == 1500
