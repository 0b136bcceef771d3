"""`data prepare` edge inputs: --out inside an --input folder, sparse vocabularies, lone surrogates."""

import json

import numpy as np
import pytest
from corpus_helpers import prepare_interrupted_after, trained_tokenizer

from lmstack.data import PrepareConfig, prepare
from lmstack.errors import DataError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    trained_tokenizer().save(path)
    return path


def _config(tmp_path, tok_dir, inputs, out, **kw):
    return PrepareConfig([str(i) for i in inputs], str(tok_dir), str(out), workers=1, val_fraction=0.0,
                         progress=False, **kw)


@pytest.mark.parametrize("rerun", [{"overwrite": True}, {"restart": True}])
def test_out_inside_input_folder_is_not_read_back(tmp_path, tok_dir, rerun):
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.txt").write_text("hello world, a small document about foxes.\n" * 3)
    out = data / "tokens"
    first = prepare(_config(tmp_path, tok_dir, [data], out))
    shards = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    if rerun.get("restart"):  # a plain rerun refuses an existing index; simulate an interrupted run instead
        (out / "index.json").unlink()
        (out / ".prepare").mkdir()
    second = prepare(_config(tmp_path, tok_dir, [data], out, **rerun))
    index = json.loads((out / "index.json").read_text())
    assert index["inputs"][0]["files"] == 1
    assert second.input_bytes == first.input_bytes
    assert second.splits["train"]["num_documents"] == first.splits["train"]["num_documents"] == 1
    assert {p.name: p.read_bytes() for p in out.glob("*.bin")} == shards


def test_input_naming_only_files_inside_out_is_refused_before_deleting(tmp_path, tok_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.txt").write_text("hello world\n")
    out = data / "tokens"
    prepare(_config(tmp_path, tok_dir, [data], out))
    with pytest.raises(DataError, match=r"--input .*index\.json names only files inside --out .*tokens.*own output"):
        prepare(_config(tmp_path, tok_dir, [out / "index.json"], out, overwrite=True))
    assert (out / "index.json").exists()  # nothing deleted


def _gap_tokenizer(path, high_id):
    """A WordLevel tokenizer (the `tokenizers` library's own format) whose ids skip numbers."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "<eos>": 2, "world": high_id}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return backend


def test_vocabulary_with_gaps_gets_uint32_and_exact_ids(tmp_path):
    backend = _gap_tokenizer(tmp_path / "tok", 70000)
    assert backend.get_vocab_size(True) == 4  # the count is tiny; the largest id is not
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"hello world {i}"}) + "\n" for i in range(3)))
    prepare(_config(tmp_path, tmp_path / "tok", [src], tmp_path / "out"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70001
    ids = np.fromfile(tmp_path / "out" / "train_000000.bin", dtype=index["dtype"])
    assert ids[:4].tolist() == backend.encode("hello world 0").ids + [2] == [1, 70000, 0, 2]


def test_shard_writer_refuses_ids_that_do_not_fit(tmp_path):
    from lmstack.data.shards import ShardWriter

    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 100, 2)
    with pytest.raises(DataError, match=r"a train document: token id 70000 does not fit uint16 shards \(ids 0\.\.65535\)"):
        writer.add(np.array([1, 70000], dtype=np.uint32))
    with pytest.raises(DataError, match=r"eos_token_id: token id 70000 does not fit uint16 shards"):
        ShardWriter(tmp_path, "train", np.dtype(np.uint16), 100, 70000)


def test_an_eos_edit_between_interruption_and_rerun_starts_over(tmp_path, tok_dir, capsys):
    """EOS comes from tokenizer_config.json, outside tokenizer.json's fingerprint: a rerun with
    another EOS must not resume shards that end documents with the old one."""
    import shutil

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i} " * 30}) + "\n" for i in range(40)))
    other = tmp_path / "tok-other-eos"
    shutil.copytree(tok_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    tokenizer = trained_tokenizer()
    old_eos = tokenizer.eos_token_id
    config["eos_token"] = next(t for t, i in tokenizer.backend.get_vocab().items() if i != old_eos and len(t) > 1)
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    prepare_interrupted_after(_config(tmp_path, tok_dir, [src], tmp_path / "out", item_bytes=2000, shard_tokens=300), 3)
    capsys.readouterr()
    report = prepare(_config(tmp_path, other, [src], tmp_path / "out", item_bytes=2000, shard_tokens=300))
    assert report.resumed_items == 0 and "starting over" in capsys.readouterr().out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["eos_token_id"] != old_eos
