"""`data prepare`: shards + index, EOS between documents, byte-identical re-runs, resume, bad input."""

import hashlib
import json
import random
import shutil

import numpy as np
import pytest
from corpus_helpers import prepare_interrupted_after, stdlib_files, trained_tokenizer

from lmstack.data import CleanConfig, PrepareConfig, TokenDataset, prepare
from lmstack.data import pipeline as pipeline_module
from lmstack.errors import DataError
from lmstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    trained_tokenizer().save(path)
    return path


def docs_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def read_documents(out, split):
    """Split a prepared split's token stream on EOS and decode each document."""
    index = json.loads((out / "index.json").read_text())
    tok = Tokenizer.load(out / "tokenizer")
    stream = np.concatenate([np.fromfile(out / s["file"], dtype=index["dtype"])
                             for s in index["splits"][split]["shards"]] or [np.zeros(0, np.uint16)])
    cuts = np.flatnonzero(stream == index["eos_token_id"])
    assert len(cuts) == index["splits"][split]["num_documents"] and (not len(stream) or cuts[-1] == len(stream) - 1)
    return [tok.decode(part[:-1].tolist()) for part in np.split(stream, cuts + 1)[:-1]]


def snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "report.json"}


def test_documents_eos_index_and_validation_split(tmp_path, tok_dir):
    texts = [f"document {i}: def f(x):\n    return x * {i}\n" for i in range(20)]
    texts[7] = "spells a special token <|eos|> and <|im_start|> as text"
    src = docs_jsonl(tmp_path / "d.jsonl", texts)
    report = prepare(PrepareConfig([str(src)], str(tok_dir), str(tmp_path / "out"), val_fraction=0.2,
                                   shard_tokens=50, workers=1, progress=False))
    out = tmp_path / "out"
    train, val = read_documents(out, "train"), read_documents(out, "val")
    assert val == [texts[i] for i in (2, 7, 12, 17)]  # every fifth document, spread over the corpus
    assert train == [t for i, t in enumerate(texts) if i not in (2, 7, 12, 17)]
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["tokenizer"]["fingerprint"] == trained_tokenizer().fingerprint
    for split in ("train", "val"):
        shards = index["splits"][split]["shards"]
        assert all(s["num_tokens"] == 50 for s in shards[:-1]) and len(shards) == report.splits[split]["shards"]
        for s in shards:
            assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        assert sum(s["num_tokens"] for s in shards) == index["splits"][split]["num_tokens"]
    [source] = index["inputs"]
    assert source["bytes"] == src.stat().st_size and source["files"] == 1
    assert Tokenizer.load(out / "tokenizer").fingerprint == trained_tokenizer().fingerprint
    assert json.loads((out / "report.json").read_text())["splits"]["val"]["num_documents"] == 4


def copy_stdlib_slice(tmp_path, n=12):
    src = tmp_path / "src"
    src.mkdir()
    for p in stdlib_files(n):
        shutil.copy(p, src / p.name)
    return src


def test_rerun_is_byte_identical_for_any_worker_count(tmp_path, tok_dir):
    src = copy_stdlib_slice(tmp_path)
    config = dict(inputs=[str(src)], tokenizer=str(tok_dir), shard_tokens=20_000, val_fraction=0.1,
                  item_bytes=1 << 15, progress=False)
    prepare(PrepareConfig(out=str(tmp_path / "a"), workers=1, **config))
    prepare(PrepareConfig(out=str(tmp_path / "b"), workers=2, **config))
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a == b and sum(name.startswith("train_") for name in a) > 5
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare(PrepareConfig(out=str(tmp_path / "a"), workers=1, **config))
    prepare(PrepareConfig(out=str(tmp_path / "a"), workers=1, overwrite=True, **config))
    assert snapshot(tmp_path / "a") == a


def planted_duplicates(n=60, seed=0):
    rng = random.Random(seed)
    texts = [" ".join(f"w{rng.randrange(10**5)}" for _ in range(60)) for _ in range(n)]
    texts[40] = texts[3]  # exact duplicate, after the interruption point
    words = texts[5].split()
    texts[50] = " ".join(words[:-2] + ["changed", "words"])  # near duplicate
    return texts


def test_interrupted_run_resumes_to_identical_output(tmp_path, tok_dir, monkeypatch):
    src = docs_jsonl(tmp_path / "d.jsonl", planted_duplicates())
    config = dict(inputs=[str(src)], tokenizer=str(tok_dir), shard_tokens=300, val_fraction=0.1,
                  item_bytes=2000, workers=1, progress=False, clean=CleanConfig(near_dedup=True))
    prepare(PrepareConfig(out=str(tmp_path / "full"), **config))
    expected = snapshot(tmp_path / "full")

    prepare_interrupted_after(PrepareConfig(out=str(tmp_path / "part"), **config), 12)
    part = tmp_path / "part"
    assert not (part / "index.json").exists() and (part / ".prepare" / "state.json").exists()
    with pytest.raises(DataError, match="interrupted `data prepare`.*resume"):
        TokenDataset(part, 8)
    report = prepare(PrepareConfig(out=str(part), **config))
    assert report.resumed_items > 0 and not (part / ".prepare").exists()
    assert snapshot(part) == expected
    full_report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert full_report["cleaning"]["exact_duplicates"]["documents"] == 1
    assert full_report["cleaning"]["near_duplicates"]["documents"] == 1
    assert report.cleaning == full_report["cleaning"]


def test_crash_while_writing_a_shard_leaves_nothing_readable(tmp_path, tok_dir, monkeypatch):
    src = docs_jsonl(tmp_path / "d.jsonl", [f"text number {i} " * 20 for i in range(30)])
    config = dict(inputs=[str(src)], tokenizer=str(tok_dir), shard_tokens=200, workers=1, progress=False)
    original = pipeline_module.ShardWriter._write
    state = {"n": 0}

    def crash_mid_write(self, tokens):
        state["n"] += 1
        if state["n"] == 3:  # half the bytes reach the temporary file, then the machine "dies"
            (self.directory / f".{self.split}_000002.bin.tmp").write_bytes(tokens.tobytes()[:100])
            raise OSError("disk full")
        return original(self, tokens)

    monkeypatch.setattr(pipeline_module.ShardWriter, "_write", crash_mid_write)
    with pytest.raises(OSError):
        prepare(PrepareConfig(out=str(tmp_path / "out"), **config))
    out = tmp_path / "out"
    assert not (out / "train_000002.bin").exists() and not (out / "index.json").exists()
    monkeypatch.setattr(pipeline_module.ShardWriter, "_write", original)
    prepare(PrepareConfig(out=str(out), **config))
    assert not list(out.glob(".*.tmp")) and read_documents(out, "train")[0] == "text number 0 " * 20
    assert TokenDataset(out, 16).num_tokens == json.loads((out / "index.json").read_text())["splits"]["train"][
        "num_tokens"]


def test_bad_records_fail_or_are_counted(tmp_path, tok_dir):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b'{"text": "good one"}\n{"txt": "no field"}\n{"text": "good two"}\nnot json\n')
    config = dict(inputs=[str(src)], tokenizer=str(tok_dir), workers=1, progress=False, val_fraction=0.0)
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'text'.*--skip-bad"):
        prepare(PrepareConfig(out=str(tmp_path / "a"), **config))
    report = prepare(PrepareConfig(out=str(tmp_path / "b"), skip_bad=True, **config))
    assert report.bad_records == 2 and report.bad_examples[1].endswith("d.jsonl:4: malformed JSON "
                                                                        "(Expecting value at column 1)")
    assert read_documents(tmp_path / "b", "train") == ["good one", "good two"]
    assert "no validation documents" not in " ".join(report.warnings)


def test_empty_corpus_and_bad_tokenizer(tmp_path, tok_dir):
    src = docs_jsonl(tmp_path / "d.jsonl", ["a", "b"])
    with pytest.raises(DataError, match=r"empty after cleaning: 2 documents read, 2 removed by filters"):
        prepare(PrepareConfig([str(src)], str(tok_dir), str(tmp_path / "o"), workers=1, progress=False,
                              clean=CleanConfig(min_chars=5)))
    no_eos = tmp_path / "no_eos"
    Tokenizer(trained_tokenizer().backend, {}).save(no_eos)
    with pytest.raises(DataError, match="names no eos_token"):
        prepare(PrepareConfig([str(src)], str(no_eos), str(tmp_path / "o2"), progress=False))


def test_uint32_shards_for_big_vocabularies(tmp_path):
    base = trained_tokenizer()
    from tokenizers import Tokenizer as HF
    backend = HF.from_str(base.backend.to_str())
    backend.add_tokens([f"zqtok{i}" for i in range(65_000)])
    big = Tokenizer(backend, base.config)
    big.save(tmp_path / "tok")
    src = docs_jsonl(tmp_path / "d.jsonl", ["x zqtok64999 y", "zqtok7"])
    prepare(PrepareConfig([str(src)], str(tmp_path / "tok"), str(tmp_path / "out"), workers=1, progress=False,
                          val_fraction=0.0))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["vocab_size"] > 65536
    assert read_documents(tmp_path / "out", "train") == ["x zqtok64999 y", "zqtok7"]
    assert int(np.fromfile(tmp_path / "out" / "train_000000.bin", dtype=np.uint32).max()) > 65535
