"""TokenDataset: windows are slices of the token stream, rank-disjoint, seeded, exactly resumable."""

import json

import numpy as np
import pytest
import torch

from lmstack.data import TokenDataset
from lmstack.data.shards import FORMAT, FORMAT_VERSION, ShardWriter
from lmstack.errors import DataError


def write_stream(out, tokens, shard_tokens=1000, split="train"):
    """A prepared directory whose stream is `tokens` (one document, EOS appended by the writer)."""
    out.mkdir(exist_ok=True)
    writer = ShardWriter(out, split, np.dtype(np.uint16), shard_tokens, eos_id=65535)
    writer.add(np.asarray(tokens, dtype=np.uint16))
    writer.finish()
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "format": FORMAT, "version": FORMAT_VERSION, "dtype": "uint16", "vocab_size": 65536,
        "eos_token_id": 65535, "tokenizer": {"fingerprint": "test", "dir": "tokenizer"}, "splits": {}}
    index["splits"][split] = writer.summary()
    index_path.write_text(json.dumps(index))
    return out


@pytest.fixture
def counting(tmp_path):
    """Token i has value i, so a window's first token is its start offset."""
    return write_stream(tmp_path / "d", np.arange(10_000), shard_tokens=777)


def starts(x):
    return x[:, 0].tolist()


def test_windows_are_shifted_slices_across_shards(counting):
    ds = TokenDataset(counting, seq_len=100)
    assert ds.num_tokens == 10_001 and ds.vocab_size == 65536 and ds.windows_per_epoch == 99  # one window kept spare so epochs can shift the cut
    x, y = ds.next_batch(8)
    assert x.dtype == torch.int64 and x.shape == (8, 100)
    for row_x, row_y in zip(x, y):
        first = int(row_x[0])
        assert first % 100 == 0  # epoch 0: windows start at multiples of seq_len
        assert torch.equal(row_x, torch.arange(first, first + 100))
        assert torch.equal(row_y, torch.arange(first + 1, first + 101))  # crosses 777-token shards


def test_ranks_are_disjoint_and_cover_the_epoch(counting):
    seen = []
    for rank in range(3):
        ds = TokenDataset(counting, seq_len=100, rank=rank, world_size=3, seed=5)
        x, _ = ds.next_batch(33)  # 100 windows // 3 ranks = 33 each
        seen.append(set(starts(x)))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(seen[0] | seen[1] | seen[2]) == 99


def test_seeded_order_and_new_edges_each_epoch(counting):
    a, b, c = (TokenDataset(counting, 100, seed=s) for s in (1, 1, 2))
    xa, xb, xc = a.next_batch(99)[0], b.next_batch(99)[0], c.next_batch(99)[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert sorted(starts(xa)) == list(range(0, 9_900, 100))  # one epoch = every window once



def test_window_edges_move_between_epochs(tmp_path):
    ds = TokenDataset(write_stream(tmp_path / "d", np.arange(10_050)), 100, seed=1)  # 99 windows, 149 spare
    offsets = []
    for epoch in range(6):
        x = ds.next_batch(99)[0]
        offset = int(x[0, 0]) % 100
        assert ds.epoch == epoch and all(s % 100 == offset for s in starts(x)) and int(x[0, 0]) // 100 * 100 <= 10_050
        assert len(set(starts(x))) == 99
        assert max(starts(x)) + 101 <= 10_050  # every window fits
        offsets.append(int(min(starts(x))))
    assert offsets[0] == 0 and len(set(offsets[1:])) > 1  # cuts move across the whole window length


def test_resume_continues_exactly(counting):
    reference = TokenDataset(counting, 64, seed=3, rank=1, world_size=2)
    batches = [reference.next_batch(7)[0] for _ in range(30)]  # crosses epoch boundaries (78 windows/rank)
    first = TokenDataset(counting, 64, seed=3, rank=1, world_size=2)
    for _ in range(17):
        first.next_batch(7)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON trainer state
    resumed = TokenDataset(counting, 64, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for expected in batches[17:]:
        x, y = resumed.next_batch(7)
        assert torch.equal(x, expected) and torch.equal(y, expected + 1)
    with pytest.raises(DataError, match="seq_len=64 but this dataset has seq_len=32"):
        TokenDataset(counting, 32, seed=3).load_state_dict(state)


def test_world_size_change_continues_the_global_order(counting):
    single = TokenDataset(counting, 50, seed=0)
    order = starts(single.next_batch(40)[0])
    first = TokenDataset(counting, 50, seed=0)
    first.next_batch(10)
    rank_rows = []
    for rank in range(2):
        ds = TokenDataset(counting, 50, seed=0, rank=rank, world_size=2)
        ds.load_state_dict(first.state_dict())
        rank_rows.append(starts(ds.next_batch(15)[0]))
    interleaved = [s for pair in zip(*rank_rows) for s in pair]
    assert interleaved == order[10:40]


def test_eval_batches_fixed_order(tmp_path):
    out = write_stream(tmp_path / "d", np.arange(5000))
    write_stream(out, np.arange(1000, 1601), split="val")
    val = TokenDataset(out, 100, split="val")
    batches = list(val.iter_eval_batches(4))
    assert [starts(x) for x, _ in batches] == [[1000, 1100, 1200, 1300], [1400, 1500]]
    assert len(list(val.iter_eval_batches(1, max_batches=3))) == 3
    r1 = TokenDataset(out, 100, split="val", rank=1, world_size=2)
    assert [starts(x) for x, _ in r1.iter_eval_batches(8)] == [[1100, 1300, 1500]]


def test_clear_errors(tmp_path, counting):
    with pytest.raises(DataError, match="does not exist; create it with `lmstack data prepare"):
        TokenDataset(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no index.json"):
        TokenDataset(tmp_path / "empty", 8)
    with pytest.raises(DataError, match="too few for one window of seq_len=20000"):
        TokenDataset(counting, 20_000)
    with pytest.raises(DataError, match="no split 'val'"):
        TokenDataset(counting, 8, split="val")
    with open(counting / "train_000003.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train_000003.bin has 10 bytes"):
        TokenDataset(counting, 8)
