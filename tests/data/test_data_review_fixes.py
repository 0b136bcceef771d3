"""Regressions from the data-pipeline review: no silent loss of input, and errors that say what to do."""

import bz2
import gzip
import json
import lzma
import os

import pytest
from corpus_helpers import trained_tokenizer

from lmstack.data import CleanConfig, PreferenceDataset, PrepareConfig, prepare
from lmstack.data import pipeline as pipeline_module
from lmstack.data.clean import Deduplicator, lsh_params, minhash_signature
from lmstack.data.preference import load_preference_records
from lmstack.data.sft import read_json_records
from lmstack.data.sources import Span, iter_documents, read_span, resolve_inputs
from lmstack.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    trained_tokenizer().save(path)
    return path


def _docs(specs, **kw):
    return [d.text for d in iter_documents(specs, **kw)]


def _prepare(tok_dir, inputs, out, **kw):
    kw = {"workers": 1, "progress": False, "val_fraction": 0.0} | kw
    return prepare(PrepareConfig(inputs=[str(i) for i in inputs], tokenizer=str(tok_dir), out=str(out), **kw))


# ---- 1. symbolic links -------------------------------------------------------------------
def test_symlinked_folders_are_followed_like_a_glob(tmp_path):
    elsewhere, corpus = tmp_path / "elsewhere", tmp_path / "corpus"
    (elsewhere / "deep").mkdir(parents=True)
    corpus.mkdir()
    (elsewhere / "shared.txt").write_text("reached through a linked folder")
    (elsewhere / "deep" / "more.txt").write_text("and one level further down")
    (corpus / "a.txt").write_text("plain document")
    os.symlink(elsewhere, corpus / "linked")
    os.symlink(corpus, elsewhere / "deep" / "cycle")  # a loop back up: must not recurse forever
    folder = [f.path for f in resolve_inputs(str(corpus))[0][1]]
    assert folder == [str(corpus / "a.txt"), str(corpus / "linked" / "deep" / "more.txt"),
                      str(corpus / "linked" / "shared.txt")]
    globbed = [f.path for f in resolve_inputs(str(corpus / "*") + "/**/*.txt")[0][1]]
    assert set(globbed) >= set(folder[1:])
    assert _docs(str(corpus)) == ["plain document", "and one level further down", "reached through a linked folder"]


def test_a_broken_symlink_is_an_error_or_a_counted_bad_record(tmp_path, tok_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("plain document")
    os.symlink(tmp_path / "gone.txt", corpus / "broken.txt")
    for n, spec in enumerate((corpus, f"{corpus}/*.txt")):
        with pytest.raises(DataError, match=r"broken.txt:1: broken symbolic link \(its target .*gone.txt does not "
                                            r"exist: repair or remove the link\)"):
            _docs(str(spec))
        with pytest.raises(DataError, match="broken.txt:1: broken symbolic link"):
            _prepare(tok_dir, [spec], tmp_path / f"out{n}")
        report = _prepare(tok_dir, [spec], tmp_path / f"out{n}", skip_bad=True)
        assert report.bad_records == 1 and "broken.txt:1: broken symbolic link" in report.bad_examples[0]
        assert report.splits["train"]["num_documents"] == 1


# ---- 2. near-dedup thresholds near 1 -----------------------------------------------------
@pytest.mark.parametrize("threshold", [0.99, 0.995, 1.0])
def test_high_near_dedup_thresholds_work(threshold):
    dedup = Deduplicator(CleanConfig(near_dedup=True, near_dedup_threshold=threshold))
    text = " ".join(f"word{i}" for i in range(400))
    assert not dedup.is_near_duplicate(minhash_signature(text))
    assert dedup.is_near_duplicate(minhash_signature(text))  # identical: always found
    assert not dedup.is_near_duplicate(minhash_signature(" ".join(f"other{i}" for i in range(400))))


def test_lsh_params_keep_datasketch_choice_where_it_builds():
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.8, 0.9, 0.98):
        assert lsh_params(threshold, 128) == _optimal_param(threshold, 128, 0.5, 0.5)
    assert lsh_params(0.99, 128) == (2, 64)


def test_too_few_permutations_for_near_dedup_is_refused_up_front():
    with pytest.raises(ConfigError, match="num_perm=1 is too few for near-dedup"):
        CleanConfig(near_dedup=True, num_perm=1)


def test_overwrite_with_high_threshold_keeps_or_replaces_the_dataset(tmp_path, tok_dir, monkeypatch):
    corpus = tmp_path / "d.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "same words here again " * 3}) + "\n"
                              for i in range(20)))
    out = tmp_path / "out"
    _prepare(tok_dir, [corpus], out)
    old = (out / "index.json").read_bytes()
    # a failure while building the run's dedup/shard state must come before the old dataset is deleted
    monkeypatch.setattr(pipeline_module, "Deduplicator", lambda config: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        _prepare(tok_dir, [corpus], out, overwrite=True)
    assert (out / "index.json").read_bytes() == old and (out / "train_000000.bin").exists()
    monkeypatch.undo()
    report = _prepare(tok_dir, [corpus], out, overwrite=True, clean=CleanConfig(near_dedup=True,
                                                                                 near_dedup_threshold=0.99))
    assert report.splits["train"]["num_documents"] == 20


# ---- 3. undecodable bytes in a text piece --------------------------------------------------
def test_an_undecodable_text_piece_reports_what_was_skipped(tmp_path, tok_dir):
    path = tmp_path / "a.txt"
    path.write_bytes(b"".join(b"good line %d\n" % i for i in range(1, 100)) + b"bad \xff\n")
    size = path.stat().st_size
    docs, bad, _ = read_span(Span(str(path), "text", 0, size, 1))
    assert docs == [] and len(bad) == 1 and bad[0].line == 100
    assert f"the whole text piece holding it, lines 1-100 ({size:,} bytes), is skipped" in bad[0].reason
    (tmp_path / "b.txt").write_text("other")
    report = _prepare(tok_dir, [path, tmp_path / "b.txt"], tmp_path / "out", skip_bad=True)
    assert report.bad_records == 1 and f"lines 1-100 ({size:,} bytes)" in report.bad_examples[0]


# ---- 4. everything went to validation -------------------------------------------------------
def test_all_kept_documents_in_val_says_so(tmp_path, tok_dir):
    (tmp_path / "a.txt").write_text("only one")
    with pytest.raises(DataError, match=r"the train split is empty: all 1 documents kept after cleaning went to "
                                        r"the validation split \(--val-fraction 0.5 of 1 documents\); lower "
                                        r"--val-fraction .* or add more data"):
        _prepare(tok_dir, [tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.5)


# ---- 5. messages and small fixes -------------------------------------------------------------
@pytest.mark.parametrize(("compress", "name", "command"), [
    (gzip.compress, "gzip", "gunzip"), (bz2.compress, "bzip2", "bunzip2"), (lzma.compress, "xz", "unxz"),
    (lambda b: b"\x28\xb5\x2f\xfd" + b"\x80\xff" * 10, "zstd", "zstd -d"),
])
def test_compressed_input_is_named(tmp_path, compress, name, command):
    path = tmp_path / "corpus.jsonl.z"
    path.write_bytes(compress(("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(50))).encode() * 20))
    with pytest.raises(DataError, match=rf"looks {name}-compressed: decompress it first \({command} .*corpus.jsonl.z\)"):
        _docs(str(path))


def test_utf8_bom_is_not_text(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfplain text")
    assert _docs(str(tmp_path / "a.jsonl")) == ["first", "second"]
    assert _docs(str(tmp_path / "b.txt")) == ["plain text"]


def test_sft_json_list_suffix_is_case_insensitive(tmp_path):
    path = tmp_path / "SFT.JSON"
    path.write_text(json.dumps([{"instruction": "hi", "output": "hello"}]))
    assert [r for _, r in read_json_records(path)] == [{"instruction": "hi", "output": "hello"}]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": [{"role": "user", "content": 7}], "chosen": "c", "rejected": "r"},
     r"field 'prompt': message 0 \(user\) content must be a string"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"},
     r"field 'prompt': message 0 has role 'bot'"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "x"}, "rejected": "r"},
     r"field 'chosen' is a message with role 'user'; a response must be the assistant's"),
    ({"prompt": "q", "chosen": "c", "rejected": {"role": "assistant", "content": None}},
     r"field 'rejected': message 0 \(assistant\) content must be a string"),
])
def test_preference_messages_are_checked(record, message):
    with pytest.raises(DataError, match=r"records:1: " + message):
        load_preference_records([record], trained_tokenizer())


def test_preference_truncation_counts_pairs():
    tok = trained_tokenizer()
    records = [{"prompt": "word " * 100, "chosen": " yes", "rejected": " no"},
               {"prompt": "short", "chosen": " a", "rejected": " b"}]
    assert PreferenceDataset(records, tok, max_length=32).stats.truncated == 1
