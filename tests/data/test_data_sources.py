"""Sources: files, folders, globs, jsonl, parquet, the stdlib corpus; bad input names file and line."""

import json

import pytest

from lmstack.data.sources import iter_documents, plan_spans, read_span, resolve_inputs, stdlib_files
from lmstack.errors import DataError


def test_stdlib_corpus_is_real_python():
    files = stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert any(f.name == "os.py" for f in files) and not any("site-packages" in f.parts for f in files)
    [(spec, resolved)] = resolve_inputs(["stdlib"])
    assert spec == "stdlib" and [f.path for f in resolved] == [str(f) for f in files]


def test_files_folders_globs_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n')
    (tmp_path / ".hidden").write_text("never")
    texts = [d.text for d in iter_documents([str(tmp_path)])]
    assert texts == ["one", "two", "three"]
    assert [d.text for d in iter_documents([str(tmp_path / "**" / "*.txt")])] == ["one", "two"]
    with pytest.raises(DataError, match="matches no files"):
        resolve_inputs([str(tmp_path / "*.md")])
    with pytest.raises(DataError, match="is not a file, folder, glob or built-in corpus"):
        resolve_inputs([str(tmp_path / "missing")])


def test_big_text_file_becomes_pieces_at_line_boundaries(tmp_path):
    lines = [f"line {i} " + "x" * 50 for i in range(400)]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n")
    [(_, files)] = resolve_inputs([str(path)])
    spans = list(plan_spans(files, text_piece_bytes=4096))
    assert len(spans) > 4 and spans[0].start == 0 and spans[-1].stop == path.stat().st_size
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    docs = [read_span(s)[0][0] for s in spans]
    assert "".join(d.text for d in docs) == path.read_text()
    for doc in docs:  # each piece starts on a whole line whose number is recorded
        assert doc.text.startswith(f"line {doc.line - 1} ")


def test_jsonl_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": \n{"body": "x"}\n{"text": 3}\n[1]\n{"text": "\xff\xfe"}\n'
                     + '{"text": "caf\u00e9"}\n'.encode())
    with pytest.raises(DataError, match=r"d.jsonl:3: malformed JSON"):
        list(iter_documents([str(path)]))
    bad = []
    docs = list(iter_documents([str(path)], skip_bad=True, bad=bad))
    assert [(d.text, d.line) for d in docs] == [("ok", 1), ("café", 8)]
    reasons = {b.line: b.reason for b in bad}
    assert set(reasons) == {3, 4, 5, 6, 7}
    assert "missing field 'text' (fields: body)" in reasons[4] and "is int" in reasons[5]
    assert "found list" in reasons[6] and "undecodable bytes" in reasons[7]
    assert [d.text for d in iter_documents([str(path)], text_field="body", skip_bad=True)] == ["x"]


def test_undecodable_text_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\nstill fine\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:3: undecodable bytes"):
        list(iter_documents([str(path)]))


def test_parquet_column_and_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a", None, "c", "d"], "id": [1, 2, 3, 4]}), path, row_group_size=2)
    with pytest.raises(DataError, match="has no column 'text' .*content"):
        list(iter_documents([str(path)]))
    with pytest.raises(DataError, match=r"d.parquet:2: column 'content' is NoneType"):
        list(iter_documents([str(path)], text_field="content"))
    docs = list(iter_documents([str(path)], text_field="content", skip_bad=True))
    assert [(d.text, d.line) for d in docs] == [("a", 1), ("c", 3), ("d", 4)]
    [(_, files)] = resolve_inputs([str(path)])
    assert [(s.start, s.stop) for s in plan_spans(files, parquet_rows=3)] == [(0, 3), (3, 4)]


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="the corpus is empty"):
        list(iter_documents([str(path)]))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    assert len(list(iter_documents([str(tmp_path / "d.jsonl")]))) == 1
