"""Cleaning: Unicode NFC, control characters, quality filters, exact and near-duplicate removal.

Per-document work (`DocumentCleaner.clean`, `minhash_signature`) runs in worker processes;
the decisions that need the whole corpus (`Deduplicator`) run in the main process in input
order, so the result never depends on the number of workers. Near duplicates use
datasketch's MinHash + LSH on word 5-gram shingles (documents shorter than one shingle are
left to exact dedup). `CleaningStats` counts, for every step,
the documents and bytes it removed.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass, field

import numpy as np

# C0/C1 control characters except tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class CleanConfig:
    """What `lmstack data prepare` does to each document before tokenizing it."""

    nfc: bool = True  # Unicode NFC normalization
    strip_control: bool = True  # remove C0/C1 control characters (tab/newline/CR kept)
    min_chars: int = 1  # drop documents shorter than this (after cleaning)
    max_chars: int = 0  # drop documents longer than this (0 = no limit)
    max_non_alnum_ratio: float = 1.0  # drop when more of the non-space characters are not letters/digits
    max_repeated_line_ratio: float = 1.0  # drop when more of the non-empty lines repeat an earlier line
    dedup: bool = True  # drop exact duplicates (same text after cleaning)
    near_dedup: bool = False  # drop near duplicates (MinHash + LSH)
    near_dedup_threshold: float = 0.8  # Jaccard similarity of word 5-gram shingles
    num_perm: int = 128  # MinHash permutations
    shingle_words: int = 5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse options that make no sense (before any input is read), naming the CLI flag."""
        from lmstack.errors import ConfigError

        for name in ("min_chars", "max_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be a whole number of characters >= 0")
        for name in ("num_perm", "shingle_words"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CleanConfig.{name}={value!r} must be a whole number >= 1")
        if self.max_chars and self.min_chars > self.max_chars:
            raise ConfigError(f"--min-chars {self.min_chars} is above --max-chars {self.max_chars}: every document "
                              "would be dropped; lower --min-chars or raise --max-chars (0 = no limit)")
        for name in ("max_non_alnum_ratio", "max_repeated_line_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be a ratio in [0, 1] "
                                  "(1 = no filter)")
        value = self.near_dedup_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ConfigError(f"--near-dedup-threshold {value!r} must be a Jaccard similarity in (0, 1], "
                              "e.g. 0.8")
        if self.near_dedup:
            if self.num_perm < 2:
                raise ConfigError(f"CleanConfig.num_perm={self.num_perm} is too few for near-dedup: MinHash LSH "
                                  "needs at least 2 permutations (default 128)")
            lsh_params(value, self.num_perm)  # what MinHashLSH will be built with; cheap (~20 ms)

    def filter_names(self) -> list[str]:
        return ["min_chars", "max_chars", "non_alnum_ratio", "repeated_line_ratio"]


@dataclass
class StepCount:
    documents: int = 0
    bytes: int = 0

    def add(self, nbytes: int) -> None:
        self.documents += 1
        self.bytes += nbytes


@dataclass
class CleaningStats:
    """Documents and bytes each step removed (or, for the rewrites, changed)."""

    input_documents: int = 0
    input_bytes: int = 0
    nfc_changed: StepCount = field(default_factory=StepCount)  # bytes = size change
    control_chars_removed: StepCount = field(default_factory=StepCount)  # bytes removed
    filtered: dict[str, StepCount] = field(default_factory=dict)
    exact_duplicates: StepCount = field(default_factory=StepCount)
    near_duplicates: StepCount = field(default_factory=StepCount)
    kept_documents: int = 0
    kept_bytes: int = 0

    def merge(self, other: CleaningStats) -> None:
        self.input_documents += other.input_documents
        self.input_bytes += other.input_bytes
        for name in ("nfc_changed", "control_chars_removed", "exact_duplicates", "near_duplicates"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.documents += theirs.documents
            mine.bytes += theirs.bytes
        for name, count in other.filtered.items():
            mine = self.filtered.setdefault(name, StepCount())
            mine.documents += count.documents
            mine.bytes += count.bytes
        self.kept_documents += other.kept_documents
        self.kept_bytes += other.kept_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CleaningStats:
        stats = cls(input_documents=data["input_documents"], input_bytes=data["input_bytes"],
                    kept_documents=data["kept_documents"], kept_bytes=data["kept_bytes"])
        for name in ("nfc_changed", "control_chars_removed", "exact_duplicates", "near_duplicates"):
            setattr(stats, name, StepCount(**data[name]))
        stats.filtered = {k: StepCount(**v) for k, v in data["filtered"].items()}
        return stats


def non_alnum_ratio(text: str) -> float:
    """Share of non-whitespace characters that are not letters or digits."""
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 1.0
    return sum(not c.isalnum() for c in visible) / len(visible)


def repeated_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line of the same document."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


class DocumentCleaner:
    """Normalizes one document and applies the filters; counts into `stats`."""

    def __init__(self, config: CleanConfig, stats: CleaningStats):
        self.config = config
        self.stats = stats

    def clean(self, text: str) -> str | None:
        """The cleaned text, or None when a filter removed the document."""
        config, stats = self.config, self.stats
        size = len(text.encode("utf-8"))
        stats.input_documents += 1
        stats.input_bytes += size
        if config.nfc and not unicodedata.is_normalized("NFC", text):
            normalized = unicodedata.normalize("NFC", text)
            stats.nfc_changed.add(size - len(normalized.encode("utf-8")))
            text, size = normalized, len(normalized.encode("utf-8"))
        if config.strip_control:
            stripped, n = _CONTROL.subn("", text)
            if n:
                new_size = len(stripped.encode("utf-8"))
                stats.control_chars_removed.add(size - new_size)
                text, size = stripped, new_size
        reason = self.failed_filter(text)
        if reason is not None:
            stats.filtered.setdefault(reason, StepCount()).add(size)
            return None
        return text

    def failed_filter(self, text: str) -> str | None:
        config = self.config
        if len(text) < config.min_chars:
            return "min_chars"
        if config.max_chars and len(text) > config.max_chars:
            return "max_chars"
        if config.max_non_alnum_ratio < 1.0 and non_alnum_ratio(text) > config.max_non_alnum_ratio:
            return "non_alnum_ratio"
        if config.max_repeated_line_ratio < 1.0 and repeated_line_ratio(text) > config.max_repeated_line_ratio:
            return "repeated_line_ratio"
        return None


def content_hash(text: str) -> bytes:
    """16-byte BLAKE2b of the text: exact-duplicate key."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, words: int = 5) -> set[bytes]:
    """Lower-cased word n-grams; empty for a document shorter than n words.

    A short document has no n-gram to compare: folding it into one shingle made every document
    without word characters (emoji, punctuation, box drawing) the same shingle b"", and any two
    short documents sharing their words ("a + b", "a - b") identical. Such documents are left
    out of near-dedup; exact dedup still removes their copies.
    """
    tokens = _WORD.findall(text.lower())
    return {" ".join(tokens[i:i + words]).encode("utf-8") for i in range(len(tokens) - words + 1)}


def minhash_signature(text: str, num_perm: int = 128, words: int = 5) -> np.ndarray:
    """datasketch MinHash (affine32 scheme: uint32 values) of the word shingles.

    A document with no shingle (fewer than `words` words) gets the empty MinHash (every value
    2**32 - 1), which `Deduplicator.is_near_duplicate` never counts as a duplicate.
    """
    from datasketch import MinHash

    mh = MinHash(num_perm=num_perm, seed=1, scheme="affine32")
    mh.update_batch(sorted(shingles(text, words)))
    return mh.hashvalues.astype(np.uint32)


def is_empty_signature(signature: np.ndarray) -> bool:
    """The MinHash of no shingles: all values at the affine32 maximum."""
    return bool(np.all(signature == np.uint32(0xFFFFFFFF)))


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for MinHashLSH at `threshold`: datasketch's own choice when it can build it.

    datasketch picks the (b, r) that minimises false positives + false negatives, and for
    thresholds near 1 (0.99 and above at 128 permutations) that is a single band, which its
    MinHashLSH refuses ("b < 2"). Then we take the best (b, r) with at least 2 bands, by the same
    measure. LSH only proposes candidates and the decision is the signatures' agreement against
    the threshold; at 128 permutations thresholds >= 0.99 get (2, 64), and agreement >= 0.99
    leaves at most one differing value, so one band is equal and no duplicate is missed.
    Thresholds datasketch can build keep exactly its parameters (and so the same output).
    """
    from datasketch.lsh import _false_negative_probability, _false_positive_probability, _optimal_param

    b, r = _optimal_param(threshold, num_perm, 0.5, 0.5)
    if b >= 2:
        return b, r
    best, error = (2, num_perm // 2), float("inf")
    for b in range(2, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            e = 0.5 * _false_positive_probability(threshold, b, r) + 0.5 * _false_negative_probability(threshold, b, r)
            if e < error:
                best, error = (b, r), e
    return best


class Deduplicator:
    """Exact (hash set) and near (MinHash LSH) duplicate detection, first occurrence kept.

    New hashes and signatures are also queued in `new_hashes`/`new_signatures`, so prepare can
    append them to its resume state at each checkpoint.
    """

    def __init__(self, config: CleanConfig):
        self.config = config
        self.hashes: set[bytes] = set()
        self.lsh = None
        self.signatures: list[np.ndarray] = []
        self.new_hashes: list[bytes] = []
        self.new_signatures: list[np.ndarray] = []
        if config.near_dedup:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(num_perm=config.num_perm,
                                  params=lsh_params(config.near_dedup_threshold, config.num_perm))

    def is_exact_duplicate(self, digest: bytes) -> bool:
        if not self.config.dedup:
            return False
        if digest in self.hashes:
            return True
        self.hashes.add(digest)
        self.new_hashes.append(digest)
        return False

    def is_near_duplicate(self, signature: np.ndarray) -> bool:
        """True when a kept document's estimated Jaccard similarity reaches the threshold.

        An empty signature (a document shorter than one shingle) is never a near duplicate and
        is not indexed: with no shingles there is no similarity to estimate.
        """
        if self.lsh is None or is_empty_signature(signature):
            return False
        for key in self.lsh.query(self._minhash(signature)):
            # LSH gives candidates; the decision uses the signature estimate against the threshold.
            if np.mean(self.signatures[key] == signature) >= self.config.near_dedup_threshold:
                return True
        self._insert(signature)
        self.new_signatures.append(signature)
        return False

    def restore(self, hashes: np.ndarray, signatures: np.ndarray) -> None:
        """Rebuild from saved state (resume): hashes (n, 16) uint8, signatures (m, num_perm) uint32."""
        self.hashes = {bytes(row) for row in hashes}
        for signature in signatures:
            self._insert(signature)

    def _minhash(self, signature: np.ndarray):
        from datasketch import MinHash

        return MinHash(num_perm=self.config.num_perm, seed=1, hashvalues=signature, scheme="affine32")

    def _insert(self, signature: np.ndarray) -> None:
        if self.lsh is not None:
            self.lsh.insert(len(self.signatures), self._minhash(signature))
            self.signatures.append(signature)
