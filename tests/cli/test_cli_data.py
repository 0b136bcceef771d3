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
    assert "filter min_chars                  1 documents              2 bytes" in out.stdout
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
