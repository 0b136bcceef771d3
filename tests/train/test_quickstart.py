"""`lmstack quickstart` end to end on a tiny plan, and its unigram baseline against a direct count."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest

from lmstack.errors import ConfigError
from lmstack.train.quickstart import Plan, run_quickstart, unigram_baseline

TINY = Plan(corpus_every=150, vocab_size=300, seq_len=32, batch_size=8, lr=5e-3, max_steps=120, train_seconds=0,
            val_fraction=0.25,
            model_overrides=dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                                 max_position_embeddings=128, rope_scaling=None))


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("quickstart") / "qs"
        printed = []
        result = run_quickstart(str(out), device="cpu", progress=False, plan=TINY, log=printed.append)
        yield out, result, "\n".join(printed)
    finally:  # the rest of the session keeps its own thread count
        torch.set_num_threads(threads)


def test_quickstart_pipeline_on_a_tiny_plan(quickstart_run, tmp_path):
    out, result, printed = quickstart_run
    for name in ("model/config.json", "model/tokenizer.json", "report.md", "loss.png", "metrics.jsonl",
                 "data/index.json", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    assert result["val loss (nats/token)"] < result["unigram baseline (nats/token)"]
    assert "lmstack chat" in printed and "lmstack serve" in printed and "def fibonacci(n):" in printed
    assert "unigram baseline" in (out / "report.md").read_text()
    assert json.loads((out / "quickstart.json").read_text())["status"] == "done"
    # it was made by quickstart, so running again replaces it; anything else is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="was not made by quickstart"):
        run_quickstart(str(tmp_path / "mine"), device="cpu", progress=False, plan=TINY)


def test_unigram_baseline_matches_a_direct_count(quickstart_run):
    from lmstack.data.shards import open_split, read_index

    data = quickstart_run[0] / "data"
    index = read_index(data)
    train = np.concatenate([np.asarray(s) for s in open_split(data, index, "train")]).tolist()
    val = np.concatenate([np.asarray(s) for s in open_split(data, index, "val")]).tolist()
    counts, vocab = collections.Counter(train), index["vocab_size"]
    total = len(train) + vocab
    expected = -sum(math.log((counts[t] + 1) / total) for t in val) / len(val)
    got, n_train, n_val = unigram_baseline(data)
    assert (n_train, n_val) == (len(train), len(val))
    assert abs(got - expected) < 1e-9
