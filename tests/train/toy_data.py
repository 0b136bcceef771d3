"""In-memory stand-ins for the data loaders' interface (TokenDataset / SFTDataset), for trainer tests.

Batches are a pure function of (call count, rank): call k of a run with world size W and batch
size B takes global rows k*B*W .. (k+1)*B*W - 1 and rank r keeps its slice, so one process with
batch W*B sees exactly the rows W processes with batch B see together (the property the DDP
and gradient-accumulation tests rely on).
"""

from __future__ import annotations

import torch


def markov_tokens(n: int, vocab: int, seed: int = 0, stream: int = 0) -> torch.Tensor:
    """A learnable stream: each token mostly follows a fixed successor (chosen by `seed`) of the one before."""
    successor = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(1000 + stream)
    noise = torch.rand(n, generator=g).tolist()
    rand = torch.randint(0, vocab, (n,), generator=g).tolist()
    succ = successor.tolist()
    out = [0]
    for i in range(1, n):
        out.append(succ[out[-1]] if noise[i] < 0.8 else rand[i])
    return torch.tensor(out)


class ToyTokenDataset:
    def __init__(self, seq_len: int, vocab_size: int = 256, rank: int = 0, world_size: int = 1,
                 num_tokens: int = 20000, seed: int = 0, split: str = "train"):
        self.seq_len, self.vocab_size, self.rank, self.world_size = seq_len, vocab_size, rank, world_size
        self.tokens = markov_tokens(num_tokens, vocab_size, seed, stream=0 if split == "train" else 1)
        self.num_tokens = num_tokens
        self.calls = 0

    def _row(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (j * 7919) % (self.num_tokens - self.seq_len - 1)
        chunk = self.tokens[start:start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.calls * batch_size * self.world_size + self.rank * batch_size
        rows = [self._row(first + i) for i in range(batch_size)]
        self.calls += 1
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None):
        n = max_batches or 4
        for k in range(n):
            first = k * batch_size * self.world_size + self.rank * batch_size
            rows = [self._row(first + i) for i in range(batch_size)]
            yield torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
