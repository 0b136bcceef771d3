"""Block accounting under any interleaving of submits, steps (finishes, preemptions) and aborts.

The real EngineCore, scheduler and block manager run; only the forward is replaced by random
logits, so hypothesis can explore thousands of steps. After every rule each block is either
free or owned, its reference count equals its number of owners, and when everything is done
every block is free again (nothing leaks).
"""

import hypothesis.strategies as st
from engine_helpers import FakeRunner, tiny_model
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmstack.engine import EngineConfig, EngineCore, SamplingParams
from lmstack.engine.sequence import SequenceStatus

PREFIXES = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23], []]  # shared prefixes exercise the prefix cache


class BlockAccounting(RuleBasedStateMachine):
    overlap = False  # async scheduling: steps read back one call later

    def __init__(self):
        super().__init__()
        model = tiny_model("llama")
        self.core = EngineCore(model, config=EngineConfig(block_size=4, num_blocks=12, max_num_batched_tokens=10,
                                                          max_num_seqs=4, async_scheduling=self.overlap))
        self.core.runner = FakeRunner(model.config.vocab_size)
        self.vocab = model.config.vocab_size
        self.finished = set()

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(3, 255), min_size=1, max_size=12),
          max_tokens=st.integers(0, 12), n=st.integers(1, 2), priority=st.integers(0, 2),
          stop=st.lists(st.integers(0, 255), max_size=20), logprobs=st.booleans())
    def submit(self, prefix, tail, max_tokens, n, priority, stop, logprobs):
        params = SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0, seed=0, stop_token_ids=stop,
                                prompt_logprobs=1 if logprobs else None)
        self.core.add_request(prefix + tail, params, priority=priority)

    @precondition(lambda self: self.core.has_unfinished())
    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            for out in self.core.step():
                if out.finished:
                    self.finished.add(out.request_id)

    @precondition(lambda self: bool(self.core.requests))
    @rule(data=st.data())
    def abort(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.core.requests)))
        out = self.core.abort_request(request_id)
        assert out.finished and all(c.finish_reason is not None for c in out.outputs)

    def live(self):
        return [seq for r in self.core.requests.values() for seq in r.sequences if not seq.is_finished]

    @invariant()
    def blocks_free_or_owned(self):
        blocks = self.core.blocks
        blocks.check(self.live())
        assert blocks.num_used_blocks == blocks.num_blocks - blocks.num_free_blocks
        for seq in self.live():
            if seq.status is SequenceStatus.WAITING:
                assert not seq.block_table and seq.num_computed_tokens == 0
            elif seq.status is SequenceStatus.FINISHING:
                assert not seq.block_table  # its last token is in flight; nothing more will run
            else:
                assert len(seq.block_table) * blocks.block_size >= seq.num_computed_tokens
        for r in self.core.requests.values():
            for seq in r.sequences:
                if seq.is_finished:
                    assert not seq.block_table, "a finished sequence still holds blocks"

    def teardown(self):
        while self.core.has_unfinished():
            self.core.step()
        blocks = self.core.blocks
        blocks.check([])
        assert blocks.num_free_blocks == blocks.num_blocks, "blocks leaked"
        assert self.core.stats().kv_blocks_used == 0


class OverlappedBlockAccounting(BlockAccounting):
    overlap = True


SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BlockAccounting.TestCase.settings = SETTINGS
OverlappedBlockAccounting.TestCase.settings = SETTINGS
test_block_accounting = BlockAccounting.TestCase
test_block_accounting_overlapped = OverlappedBlockAccounting.TestCase
