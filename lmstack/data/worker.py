"""The per-process half of `data prepare`: read spans, clean documents, tokenize, fingerprint.

A worker gets a `WorkItem` (a few spans of input files, about a megabyte), reads and decodes
them itself, and sends back numpy arrays (token ids, lengths, hashes, MinHash signatures)
plus counts; it decides nothing that needs the rest of the corpus. The pool initializer
keeps one `ItemProcessor` per process (the only module state, as multiprocessing requires).
"""

from __future__ import annotations

import array
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from lmstack.data.clean import CleanConfig, CleaningStats, DocumentCleaner, content_hash, minhash_signature
from lmstack.data.sources import BadRecord, Span, read_span


@dataclass(frozen=True)
class WorkItem:
    index: int  # position in the input order
    source: int  # which --input spec the spans come from
    spans: tuple[Span, ...]
    nbytes: int


@dataclass
class WorkerSetup:
    tokenizer_json: str
    text_field: str
    clean: CleanConfig
    single_thread: bool = True  # each worker process tokenizes on one core


@dataclass
class ItemResult:
    index: int
    source: int
    tokens: np.ndarray  # uint32: every kept document's ids, concatenated (no EOS)
    lengths: np.ndarray  # int64 tokens per document
    doc_bytes: np.ndarray  # int64 UTF-8 bytes per document (for the dedup counts)
    hashes: bytes  # 16 bytes per document (exact-duplicate keys)
    signatures: np.ndarray | None  # (documents, num_perm) uint32 when near-dedup is on
    stats: CleaningStats
    bad: list[BadRecord] = field(default_factory=list)
    raw_sha256: bytes = b""
    raw_bytes: int = 0


class ItemProcessor:
    def __init__(self, setup: WorkerSetup):
        if setup.single_thread:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # checked per call by tokenizers
        from tokenizers import Tokenizer as _HFTokenizer

        self.setup = setup
        self.backend = _HFTokenizer.from_str(setup.tokenizer_json)
        # Text that spells a special token ("<|eos|>") is data, not a control token.
        self.backend.encode_special_tokens = True

    def __call__(self, item: WorkItem) -> ItemResult:
        setup = self.setup
        stats = CleaningStats()
        cleaner = DocumentCleaner(setup.clean, stats)
        texts: list[str] = []
        bad: list[BadRecord] = []
        raw_hash = hashlib.sha256()
        raw_bytes = 0
        for span in item.spans:
            docs, bad_records, raw = read_span(span, setup.text_field)
            raw_hash.update(raw)
            raw_bytes += len(raw)
            bad.extend(bad_records)
            for doc in docs:
                text = cleaner.clean(doc.text)
                if text is not None:
                    texts.append(text)
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False) if texts else []
        ids = array.array("I")  # extending an array.array is the cheapest way out of Python lists
        lengths = np.empty(len(encodings), dtype=np.int64)
        for j, encoding in enumerate(encodings):
            doc = encoding.ids
            lengths[j] = len(doc)
            ids.extend(doc)
        tokens = np.frombuffer(ids, dtype=np.uint32) if ids.itemsize == 4 else np.array(ids, dtype=np.uint32)
        signatures = None
        if setup.clean.near_dedup:
            signatures = np.stack([minhash_signature(t, setup.clean.num_perm, setup.clean.shingle_words)
                                   for t in texts]) if texts else np.zeros((0, setup.clean.num_perm), np.uint32)
        return ItemResult(
            index=item.index, source=item.source, tokens=tokens, lengths=lengths,
            doc_bytes=np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
            hashes=b"".join(content_hash(t) for t in texts), signatures=signatures, stats=stats, bad=bad,
            raw_sha256=raw_hash.digest(), raw_bytes=raw_bytes,
        )


_processor: ItemProcessor | None = None


def init_worker(setup: WorkerSetup) -> None:
    global _processor
    _processor = ItemProcessor(setup)


def run_item(item: WorkItem) -> ItemResult:
    assert _processor is not None, "init_worker was not called in this process"
    return _processor(item)
