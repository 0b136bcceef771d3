"""`data prepare` refuses bad options and unsafe --out directories up front, with messages naming them."""

import json
from pathlib import Path

import pytest
from corpus_helpers import trained_tokenizer

from lmstack.cli import main
from lmstack.data import CleanConfig, PrepareConfig, prepare
from lmstack.data import pipeline as pipeline_module
from lmstack.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    trained_tokenizer().save(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} with some words"}) + "\n" for i in range(30)))
    return path


@pytest.mark.parametrize(("options", "message"), [
    ({"near_dedup": True, "near_dedup_threshold": 2.0}, r"--near-dedup-threshold 2.0 must be .* in \(0, 1\]"),
    ({"near_dedup_threshold": 0.0}, r"--near-dedup-threshold 0.0 must be"),
    ({"min_chars": 100, "max_chars": 10}, r"--min-chars 100 is above --max-chars 10"),
    ({"min_chars": -1}, r"--min-chars -1 must be a whole number"),
    ({"max_chars": -3}, r"--max-chars -3 must be a whole number"),
    ({"max_non_alnum_ratio": -1.0}, r"--max-non-alnum-ratio -1.0 must be a ratio in \[0, 1\]"),
    ({"max_repeated_line_ratio": 1.5}, r"--max-repeated-line-ratio 1.5 must be a ratio in \[0, 1\]"),
    ({"max_non_alnum_ratio": float("nan")}, r"--max-non-alnum-ratio nan must be a ratio"),
])
def test_bad_clean_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        CleanConfig(**options)


def test_bad_options_are_refused_before_reading_anything(tmp_path, tok_dir):
    # the input does not exist: the option error must come first, and nothing is created
    args = dict(inputs=[str(tmp_path / "missing.jsonl")], tokenizer=str(tok_dir), out=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"--workers -2 must be a number of worker processes >= 1, or 0"):
        prepare(PrepareConfig(workers=-2, **args))
    config = PrepareConfig(**args)
    config.clean.near_dedup_threshold = 2  # changed after construction: prepare checks again
    with pytest.raises(ConfigError, match="--near-dedup-threshold 2"):
        prepare(config)
    assert not (tmp_path / "out").exists()


def test_foreign_shard_files_are_never_deleted(tmp_path, tok_dir, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_000099.bin").write_bytes(b"mine")
    (out / "val_000007.bin").write_bytes(b"also mine")
    config = dict(inputs=[str(corpus)], tokenizer=str(tok_dir), out=str(out), workers=1, progress=False)
    for flags in ({}, {"overwrite": True}, {"restart": True}):
        with pytest.raises(DataError, match=r"--out .*out already holds shard files \(train_000099.bin, "
                                            r"val_000007.bin\) that no lmstack data index describes; choose an "
                                            r"empty directory or remove them"):
            prepare(PrepareConfig(**config, **flags))
    assert (out / "train_000099.bin").read_bytes() == b"mine" and (out / "val_000007.bin").read_bytes() == b"also mine"
    assert sorted(p.name for p in out.iterdir()) == ["train_000099.bin", "val_000007.bin"]

    (out / "train_000099.bin").unlink()
    (out / "val_000007.bin").unlink()
    (out / "report.json").write_text("{}")
    with pytest.raises(DataError, match=r"already holds files \(report.json\)"):
        prepare(PrepareConfig(**config))
    (out / "report.json").unlink()
    (out / "index.json").write_text('{"something": "else"}')
    with pytest.raises(DataError, match="holds an index.json that is not an lmstack data index"):
        prepare(PrepareConfig(**config, overwrite=True))
    assert (out / "index.json").read_text() == '{"something": "else"}'
    (out / "index.json").unlink()
    (out / "notes.txt").write_text("unrelated files are fine")
    prepare(PrepareConfig(**config))
    assert (out / "index.json").exists() and (out / "notes.txt").read_text() == "unrelated files are fine"


def test_crash_before_the_first_checkpoint_still_resumes(tmp_path, tok_dir, corpus, monkeypatch):
    """A shard written before the first checkpoint is the run's own: the rerun must not refuse it."""
    out = tmp_path / "out"
    config = dict(inputs=[str(corpus)], tokenizer=str(tok_dir), out=str(out), workers=1, progress=False,
                  shard_tokens=20)
    original = pipeline_module.ShardWriter._write

    def write_then_die(self, tokens):
        original(self, tokens)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module.ShardWriter, "_write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(**config))
    assert (out / "train_000000.bin").exists() and (out / ".prepare").is_dir()
    monkeypatch.setattr(pipeline_module.ShardWriter, "_write", original)
    prepare(PrepareConfig(**config))
    prepare(PrepareConfig(**{**config, "out": str(tmp_path / "fresh")}))
    names = sorted(p.name for p in (tmp_path / "fresh").glob("*.bin"))
    assert names == sorted(p.name for p in out.glob("*.bin"))
    assert all((out / n).read_bytes() == (tmp_path / "fresh" / n).read_bytes() for n in names)


def test_out_that_is_a_file_is_refused(tmp_path, tok_dir, corpus):
    target = tmp_path / "corpus.txt"
    target.write_text("keep me")
    with pytest.raises(DataError, match=r"--out .*corpus.txt is a file; give a directory"):
        prepare(PrepareConfig([str(corpus)], str(tok_dir), str(target), workers=1, progress=False))
    with pytest.raises(DataError, match=r"--out .*corpus.txt/x is inside .*corpus.txt, which is a file"):
        prepare(PrepareConfig([str(corpus)], str(tok_dir), str(target / "x"), workers=1, progress=False))
    assert target.read_text() == "keep me"


def test_non_utf8_inputs_name_the_file_and_line(tmp_path, tok_dir):
    text = tmp_path / "latin1.txt"
    text.write_bytes("café olé\n".encode("latin-1"))
    records = tmp_path / "latin1.jsonl"
    records.write_bytes(b'{"text": "fine"}\n' + '{"text": "café"}\n'.encode("latin-1"))
    for path, line in ((text, 1), (records, 2)):
        with pytest.raises(DataError, match=rf"{path.name}:{line}: undecodable bytes .* \(not UTF-8\).*--skip-bad"):
            prepare(PrepareConfig([str(path)], str(tok_dir), str(tmp_path / f"out_{path.suffix[1:]}"), workers=1,
                                  progress=False))


def test_cli_rejects_bad_options_with_exit_2(tmp_path, tok_dir, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["data", "prepare", "--input", str(corpus), "--tokenizer", str(tok_dir), "--out", "out"]
    cases = [
        (["--near_dedup", "--near_dedup_threshold", "2"], "--near-dedup-threshold 2.0 must be"),
        (["--min_chars", "100", "--max_chars", "10"], "--min-chars 100 is above --max-chars 10"),
        (["--max_non_alnum_ratio", "-1"], "--max-non-alnum-ratio -1.0 must be a ratio in [0, 1]"),
        (["--workers", "-2"], "--workers -2 must be"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not Path("out").exists()
    Path("corpus.txt").write_text("text")
    assert main(base[:-1] + ["corpus.txt"]) == 2
    assert "--out corpus.txt is a file; give a directory" in capsys.readouterr().err
