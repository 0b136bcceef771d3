"""Stop-string holding: the linear-time scan gives exactly what the old quadratic one gave."""

import random

from lmstack.infer import stopping
from lmstack.infer.params import SamplingParams
from lmstack.infer.stopping import SequenceState, _StopMatcher


def reference(text, stops):
    """The former O(L^2) implementation, kept as the reference."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _longest_stop_prefix_suffix(text, stops):
    """What SequenceState holds after reading `text` at once: the KMP state of each stop's matcher."""
    return max((_StopMatcher(stop).feed(text) for stop in stops), default=0)


def _random_text(rng, alphabet, lo, hi):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def test_matches_the_reference_on_random_strings():
    rng = random.Random(0)
    for trial in range(4000):
        alphabet = "ab" if trial % 2 else "abc"
        stops = [_random_text(rng, alphabet, 1, 8) for _ in range(rng.randint(1, 4))]
        text = _random_text(rng, alphabet, 0, 20)
        if rng.random() < 0.5:  # often end the text with part of a stop
            stop = rng.choice(stops)
            text += stop[: rng.randint(0, len(stop))]
        assert _longest_stop_prefix_suffix(text, stops) == reference(text, stops), (text, stops)


def test_sequence_state_holds_what_the_reference_holds():
    """The incremental KMP state in SequenceState agrees with the reference after every delta."""
    rng = random.Random(1)
    for _ in range(500):
        stops = [_random_text(rng, "ab", 2, 7) for _ in range(rng.randint(1, 3))]
        seq = SequenceState(0, SamplingParams(stop=stops, max_tokens=1000), max_tokens=1000)
        seen = ""
        for _ in range(30):
            delta = _random_text(rng, "ab", 0, 3)
            emitted = seq._scan(delta)
            seen += delta
            if seq.finished:
                cut = min(seen.find(s) for s in stops if s in seen)
                assert seen[:cut].endswith(emitted)
                break
            assert len(seq._held) == reference(seen, stops), (seen, stops)
            assert seen.endswith(seq._held)


def test_long_repeating_prefix_is_linear():
    """32 stops of 4000 characters and a model repeating a stop's prefix: each token reads only its
    own characters (counted through the automaton), and the answer stays right."""
    stop = "ab" * 1999 + "ac"
    stops = [stop[:-1] + chr(ord("c") + i) for i in range(32)]
    seq = SequenceState(0, SamplingParams(stop=stops, max_tokens=100000), max_tokens=100000)
    calls = []
    original = stopping._advance

    def counting(stop, pi, state, text):
        calls.append(len(text))
        return original(stop, pi, state, text)

    stopping._advance = counting
    try:
        seen = ""
        for i in range(8000):  # 16000 held characters
            seen += "ab"
            seq._scan("ab")
            if i % 997 == 0:
                assert len(seq._held) == reference(seen, stops)
    finally:
        stopping._advance = original
    assert not seq.finished
    assert len(seq._held) == 3998  # "abab...ab", the longest proper prefix the text can end with
    assert sum(calls) == 8000 * 2 * 32  # each delta character once per stop string, never the held text
    # the one-shot function on a long text agrees with the reference
    text = "x" + "ab" * 3000
    assert _longest_stop_prefix_suffix(text, stops) == reference(text, stops) == 3998
