"""Where documents come from: text files, folders, globs, .jsonl, .parquet and built-in corpora.

`resolve_inputs` turns the user's `--input` specs into a sorted, deterministic list of files;
`plan_spans` cuts them into `Span`s (a byte range of a text/jsonl file, a row range of a
parquet file) that worker processes read and decode themselves, so the main process never
touches the text. `read_span` is that reading, with errors that name the file and line.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmstack.errors import DataError

BUILTIN_CORPORA = ("stdlib",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "text" | "jsonl" | "parquet" | "broken_link" (a symlink to nothing: a bad record)
    size: int  # bytes


@dataclass(frozen=True)
class Span:
    """A piece of one input file: bytes [start, stop) of text/jsonl, rows [start, stop) of parquet."""

    path: str
    kind: str
    start: int
    stop: int
    line: int  # 1-based line (row for parquet) where the span starts


@dataclass(frozen=True)
class Document:
    text: str
    path: str
    line: int  # 1-based line (jsonl record / text piece start / parquet row)


@dataclass(frozen=True)
class BadRecord:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running Python's stdlib .py files (tests included, site-packages not), sorted.

    The few files that are deliberately not UTF-8 (encoding-declaration test fixtures) are
    left out, so the corpus needs no --skip-bad.
    """
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                try:
                    path.read_bytes().decode("utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                out.append(path)
    return sorted(out)


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _expand(spec: str) -> list[Path]:
    if spec in BUILTIN_CORPORA and not Path(spec).exists():
        return stdlib_files()
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            raise DataError(f"unknown built-in corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
        return stdlib_files()
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = sorted(p for p in matches if p.is_file() or _is_broken_link(p))
        if not files:
            raise DataError(f"--input {spec!r} matches no files")
        return files
    if path.is_dir():
        files = _walk_folder(path)
        if not files:
            raise DataError(f"--input folder {spec} has no files")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"--input {spec!r} is not a file, folder, glob or built-in corpus "
                    f"({', '.join(BUILTIN_CORPORA)})")


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _walk_folder(root: Path) -> list[Path]:
    """Every non-hidden file under `root`, sorted, following symbolic links to folders.

    Path.rglob does not follow linked folders (Python < 3.13), so a corpus assembled from links
    silently lost whole folders while the equivalent glob (`root/**/*`) read them. Each real
    folder is read once (by resolved path), which also stops link cycles. Broken links are
    kept: reading one is a bad record that names it, never a silent drop.
    """
    seen = {os.path.realpath(root)}
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in seen:
                continue
            seen.add(real)
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            candidate = Path(dirpath) / name
            if candidate.is_file() or _is_broken_link(candidate):
                files.append(candidate)
    return sorted(files)


def _input_file(path: Path) -> InputFile:
    if _is_broken_link(path):
        return InputFile(str(path), "broken_link", 0)
    return InputFile(str(path), file_kind(path), path.stat().st_size)


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
    except ValueError:
        return False
    return True


def resolve_inputs(specs: list[str] | str, exclude: str | Path | None = None) -> list[tuple[str, list[InputFile]]]:
    """[(spec, files)] for each --input spec, files sorted so every run sees the same order.

    `exclude` is the output directory (`data prepare --out`): files under it are never input,
    so an --out inside an --input folder does not feed a rerun its own index.json, shards and
    tokenizer files (nor lose an "input" that --overwrite deletes). An input spec that names
    only such files is refused. This is decided here, before the output directory is touched.
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise DataError("no --input given; pass files, folders, globs or a built-in corpus such as stdlib")
    excluded = Path(exclude).expanduser().resolve() if exclude is not None else None
    out = []
    for spec in specs:
        paths = _expand(str(spec))
        if excluded is not None:
            kept = [p for p in paths if not _is_under(p, excluded)]
            if not kept:
                raise DataError(f"--input {spec} names only files inside --out {exclude}, which are this "
                                "command's own output; give an --input outside --out, or another --out")
            paths = kept
        files = [_input_file(p) for p in paths]
        out.append((str(spec), files))
    return out


def _newline_cut(handle, start: int, target: int, size: int) -> int:
    """The first offset after a newline at or past `target` (or the end of the file)."""
    if target >= size:
        return size
    handle.seek(target)
    while True:
        block = handle.read(1 << 16)
        if not block:
            return size
        i = block.find(b"\n")
        if i >= 0:
            return handle.tell() - len(block) + i + 1


def plan_spans(files: list[InputFile], text_piece_bytes: int = 1 << 16, jsonl_span_bytes: int = 1 << 20,
               parquet_rows: int = 4096) -> Iterator[Span]:
    """Cut files into spans at line boundaries: a text file longer than `text_piece_bytes` becomes
    several documents (so one big file still gives a validation split); jsonl/parquet spans
    just bound the work per worker task."""
    for f in files:
        if f.kind == "broken_link":
            yield Span(f.path, f.kind, 0, 0, 1)
            continue
        if f.kind == "parquet":
            rows = parquet_num_rows(f.path)
            for start in range(0, rows, parquet_rows):
                yield Span(f.path, "parquet", start, min(rows, start + parquet_rows), start + 1)
            continue
        span_bytes = text_piece_bytes if f.kind == "text" else jsonl_span_bytes
        if f.size <= span_bytes:
            yield Span(f.path, f.kind, 0, f.size, 1)
            continue
        with open(f.path, "rb") as handle:
            start, line = 0, 1
            while start < f.size:
                stop = _newline_cut(handle, start, start + span_bytes, f.size)
                yield Span(f.path, f.kind, start, stop, line)
                if stop < f.size:
                    handle.seek(start)
                    line += handle.read(stop - start).count(b"\n")
                start = stop


def parquet_num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as err:
        raise DataError(f"{path} is not a readable parquet file ({err})") from None


COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip", "gunzip"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
                    (b"BZh", "bzip2", "bunzip2"), (b"\xfd7zXZ\x00", "xz", "unxz"))
UTF8_BOM = b"\xef\xbb\xbf"


def compressed_format(path: str) -> tuple[str, str] | None:
    """(format, command to decompress) when the file starts with a gzip/zstd/bzip2/xz header."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
    except OSError:
        return None
    for magic, name, command in COMPRESSED_MAGIC:
        if head.startswith(magic):
            return name, command
    return None


def _decode(raw: bytes, path: str, line: int) -> str | BadRecord:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad_line = line + raw[:err.start].count(b"\n")
        reason = f"undecodable bytes {raw[err.start:err.start + 4]!r} (not UTF-8)"
        compressed = compressed_format(path)
        if compressed is not None:
            reason += (f"; the file looks {compressed[0]}-compressed: decompress it first "
                       f"({compressed[1]} {path}) and pass the result as --input")
        return BadRecord(path, bad_line, reason)


def _last_line(raw: bytes, line: int) -> int:
    """The line number of the last line in `raw`, which starts at `line`."""
    return line + raw.count(b"\n") - (1 if raw.endswith(b"\n") else 0)


def _read_bytes(span: Span) -> bytes:
    with open(span.path, "rb") as handle:
        handle.seek(span.start)
        return handle.read(span.stop - span.start)


def read_span(span: Span, text_field: str = "text") -> tuple[list[Document], list[BadRecord], bytes]:
    """Documents, bad records and the raw bytes (for the input checksum) of one span."""
    if span.kind == "parquet":
        return _read_parquet(span, text_field)
    if span.kind == "broken_link":
        target = os.readlink(span.path) if os.path.islink(span.path) else "?"
        return [], [BadRecord(span.path, 1, f"broken symbolic link (its target {target} does not exist: "
                                            "repair or remove the link)")], b""
    raw = _read_bytes(span)
    # A UTF-8 byte order mark opens some files (Windows editors); like Python's utf-8-sig it is
    # not text. It is still part of the raw bytes (and so of the input checksum).
    body = raw[len(UTF8_BOM):] if span.start == 0 and raw.startswith(UTF8_BOM) else raw
    if span.kind == "text":
        text = _decode(body, span.path, span.line)
        if isinstance(text, BadRecord):
            # The whole piece is skipped, never a piece with a hole cut into it; say how much.
            last = _last_line(raw, span.line)
            lines = f"line {span.line}" if last == span.line else f"lines {span.line}-{last}"
            text = BadRecord(text.path, text.line, f"{text.reason}; the whole text piece holding it, "
                                                   f"{lines} ({len(raw):,} bytes), is skipped")
            return [], [text], raw
        return [Document(text, span.path, span.line)], [], raw
    docs, bad = [], []
    for i, line_bytes in enumerate(body.split(b"\n")):
        line = span.line + i
        if not line_bytes.strip():
            continue
        item = _decode(line_bytes, span.path, line)
        if isinstance(item, BadRecord):
            bad.append(item)
            continue
        try:
            record = json.loads(item)
        except json.JSONDecodeError as err:
            bad.append(BadRecord(span.path, line, f"malformed JSON ({err.msg} at column {err.colno})"))
            continue
        result = record_text(record, text_field)
        if isinstance(result, str):
            docs.append(Document(result, span.path, line))
        else:
            bad.append(BadRecord(span.path, line, result[0]))
    return docs, bad, raw


def record_text(record: object, text_field: str) -> str | tuple[str]:
    """The text field of a JSON record, or (reason,) when it is missing or not a string."""
    if not isinstance(record, dict):
        return (f"expected a JSON object with field {text_field!r}, found {type(record).__name__}",)
    if text_field not in record:
        return (f"missing field {text_field!r} (fields: {', '.join(sorted(record)) or 'none'}); "
                "choose one with --text-field",)
    value = record[text_field]
    if not isinstance(value, str):
        return (f"field {text_field!r} is {type(value).__name__}, expected a string",)
    return _surrogate_reason(value, f"field {text_field!r}") or value


def _surrogate_reason(text: str, what: str) -> tuple[str] | None:
    """(reason,) when `text` holds a lone surrogate, else None.

    JSON allows escapes such as "\\ud800" that decode to a lone UTF-16 surrogate: not Unicode,
    so UTF-8 encoding and the tokenizer would fail later with a bare UnicodeEncodeError that
    names no file or line. Reported here, it is a bad record like malformed JSON.
    """
    from lmstack.tokenizer.tokenizer import lone_surrogate

    index = lone_surrogate(text)
    if index is None:
        return None
    return (f"{what} holds a lone surrogate {text[index]!r} at character {index} (a JSON \\u escape "
            "that is not valid Unicode)",)


def _read_parquet(span: Span, text_field: str) -> tuple[list[Document], list[BadRecord], bytes]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(span.path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{span.path} has no column {text_field!r} (columns: "
                            f"{', '.join(pf.schema_arrow.names)}); choose one with --text-field")
        values: list = []
        row = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > span.start and row < span.stop:
                column = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
                values.extend(column[max(0, span.start - row):span.stop - row])
            row += n
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{span.path} is not a readable parquet file ({err})") from None
    docs, bad = [], []
    for i, value in enumerate(values):
        reason = _surrogate_reason(value, f"column {text_field!r}") if isinstance(value, str) else None
        if reason is not None:
            bad.append(BadRecord(span.path, span.start + 1 + i, reason[0]))
        elif isinstance(value, str):
            docs.append(Document(value, span.path, span.start + 1 + i))
        else:
            bad.append(BadRecord(span.path, span.start + 1 + i,
                                 f"column {text_field!r} is {type(value).__name__}, expected a string"))
    checksum_bytes = "\x00".join(v if isinstance(v, str) else "" for v in values).encode("utf-8", "surrogatepass")
    return docs, bad, checksum_bytes


def iter_documents(specs: list[str] | str, text_field: str = "text", skip_bad: bool = False,
                   bad: list[BadRecord] | None = None) -> Iterator[Document]:
    """Every document of the inputs in order (single process; `lmstack tokenizer train` uses this).

    A bad record raises DataError naming file and line, or with skip_bad is appended to `bad`.
    """
    found = False
    for _, files in resolve_inputs(specs):
        for span in plan_spans(files):
            docs, bad_records, _ = read_span(span, text_field)
            for record in bad_records:
                if not skip_bad:
                    raise DataError(f"{record} (fix it, or pass --skip-bad to skip and count bad records)")
                if bad is not None:
                    bad.append(record)
            for doc in docs:
                found = found or bool(doc.text)
                yield doc
    if not found:
        raise DataError(f"no text found in --input {specs}: the corpus is empty")
