"""Cleaning: NFC, control characters, filters with counts, exact and MinHash near-duplicate removal."""

import random

import pytest

from lmstack.data.clean import (
    CleanConfig,
    CleaningStats,
    Deduplicator,
    DocumentCleaner,
    content_hash,
    minhash_signature,
    non_alnum_ratio,
    repeated_line_ratio,
    shingles,
)


def words_doc(rng, n=200):
    return [f"w{rng.randrange(10**6)}" for _ in range(n)]


def jaccard_5gram(a: str, b: str) -> float:
    """Reference Jaccard similarity of word 5-gram sets, computed independently of lmstack."""
    def grams(text):
        w = text.lower().split()
        return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def planted_corpus(seed=0):
    """Originals, an exact copy, near copies of known Jaccard (0.90, 0.95) and far ones (0.50, 0.30)."""
    rng = random.Random(seed)
    originals = [" ".join(words_doc(rng)) for _ in range(6)]
    near, far = [], []
    for i, (m, target) in enumerate([(10, 0.90), (5, 0.95)]):
        words = originals[i].split()
        copy = " ".join(words[:-m] + words_doc(rng, m))
        assert jaccard_5gram(originals[i], copy) == pytest.approx(target, abs=0.01)
        near.append(copy)
    for i, (m, target) in enumerate([(65, 0.50), (105, 0.30)], start=2):
        words = originals[i].split()
        copy = " ".join(words[:-m] + words_doc(rng, m))
        assert jaccard_5gram(originals[i], copy) == pytest.approx(target, abs=0.01)
        far.append(copy)
    exact = [originals[4]]
    return originals, exact, near, far


def test_near_duplicates_of_known_jaccard():
    originals, exact, near, far = planted_corpus()
    config = CleanConfig(near_dedup=True, near_dedup_threshold=0.8)
    dedup = Deduplicator(config)
    kept = []
    for text in originals + exact + near + far:
        if dedup.is_exact_duplicate(content_hash(text)):
            continue
        if dedup.is_near_duplicate(minhash_signature(text)):
            continue
        kept.append(text)
    assert kept == originals + far  # exact copy and both near copies removed, distinct and far kept


def test_minhash_estimate_tracks_true_jaccard():
    originals, _, near, far = planted_corpus(1)
    for a, b in [(originals[0], near[0]), (originals[2], far[0]), (originals[3], far[1])]:
        estimate = (minhash_signature(a) == minhash_signature(b)).mean()
        assert estimate == pytest.approx(jaccard_5gram(a, b), abs=0.12)


def test_nfc_and_control_characters_are_counted():
    stats = CleaningStats()
    cleaner = DocumentCleaner(CleanConfig(), stats)
    assert cleaner.clean("cafe\u0301") == "caf\u00e9"
    assert cleaner.clean("a\x00b\x1bc\td\r\n\x7f") == "abc\td\r\n"
    assert cleaner.clean("\u200d\U0001F469\u200d\U0001F467") == "\u200d\U0001F469\u200d\U0001F467"  # ZWJ kept
    assert stats.nfc_changed.documents == 1 and stats.nfc_changed.bytes == 1
    assert stats.control_chars_removed.documents == 1 and stats.control_chars_removed.bytes == 3
    assert stats.input_documents == 3


def test_filters_report_documents_and_bytes():
    config = CleanConfig(min_chars=5, max_chars=50, max_non_alnum_ratio=0.5, max_repeated_line_ratio=0.3)
    stats = CleaningStats()
    cleaner = DocumentCleaner(config, stats)
    docs = {
        "tiny": "min_chars", "x" * 51: "max_chars", "#### ---- !!!! ab": "non_alnum_ratio",
        "same\nsame\nsame\nother": "repeated_line_ratio", "a good line\nanother line": None,
    }
    for text, reason in docs.items():
        assert (cleaner.clean(text) is None) == (reason is not None)
    for text, reason in docs.items():
        if reason:
            assert stats.filtered[reason].documents == 1 and stats.filtered[reason].bytes == len(text)
    assert non_alnum_ratio("ab!!") == 0.5 and repeated_line_ratio("a\nb\na\n\n") == pytest.approx(1 / 3)


def test_stats_round_trip_and_merge():
    a, b = CleaningStats(), CleaningStats()
    DocumentCleaner(CleanConfig(min_chars=3), a).clean("ab")
    DocumentCleaner(CleanConfig(min_chars=3), b).clean("x")
    a.merge(b)
    assert a.filtered["min_chars"].documents == 2 and a.filtered["min_chars"].bytes == 3
    assert CleaningStats.from_dict(a.to_dict()) == a


def test_documents_shorter_than_a_shingle_are_left_out_of_near_dedup():
    """No-word documents used to share the shingle b"" and short ones their joined words: all collapsed."""
    short = ["😀😀😀 🎉🎉", "!!! ??? ...", "→ ← ↑ ↓", "+-+-+\n| |\n+-+-+", "a + b", "a - b", "a * b"]
    assert all(shingles(t) == set() for t in short)
    long_text = " ".join(f"word{i}" for i in range(30))
    config = CleanConfig(near_dedup=True)
    dedup = Deduplicator(config)
    kept = [t for t in short + short + [long_text, long_text + " eight"]
            if not dedup.is_exact_duplicate(content_hash(t)) and not dedup.is_near_duplicate(minhash_signature(t))]
    assert kept == short + [long_text]  # exact copies still removed; near dedup still works for long documents
    assert len(dedup.signatures) == 1  # the short documents were never indexed
