"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (`max_num_batched_tokens`). Running sequences are served first,
in priority order (their next decode token, or the next chunk of a long prompt), then waiting
ones are admitted, lowest priority value and earliest arrival first, their prompts cut into
chunks when the budget runs out. So prefill and decode share one step and a long prompt never
stalls the decodes. When the block pool is exhausted the newest (lowest-priority) running
sequence is preempted: its blocks are freed and it is recomputed later, as vLLM does; its full
blocks usually survive in the prefix cache, so recomputing them is often free.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from lmstack.engine.kv_cache import BlockManager
from lmstack.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256  # running sequences at once (the decode batch)
    max_num_batched_tokens: int = 8192  # tokens per forward (the step's budget)
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # first token computed this step (= num_computed_tokens before the step)
    num_tokens: int  # tokens computed this step

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def completes(self) -> bool:
        """Whether this step reaches the last token, so a new token is sampled from its logits."""
        return self.end == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)  # single-token (decode) ones first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key; the last is preempted first
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of which found

    # ---- queues ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and free its blocks at once."""
        if seq in self.running:  # idempotent: a sequence may be removed before it is marked finished
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Decodes first, so a long prompt's chunks never starve them; each group in priority order.
        order = sorted(self.running, key=lambda s: s.num_uncomputed_tokens != 1)
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            end = seq.num_computed_tokens + n
            if end > len(seq.block_table) * self.blocks.block_size:  # needs new blocks (most decodes do not)
                budget += self._make_room(seq, end, out)
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                self.blocks.grow(seq, end)
            out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, n))
            budget -= n
        if not out.preempted:  # admitting while preempting would only thrash
            self._admit(budget, out)
        out.scheduled.sort(key=lambda s: s.num_tokens != 1)  # decodes first (stable)
        return out

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> int:
        """Preempt from the back of `running` until seq's blocks fit (possibly seq itself).

        Returns the budget given back by victims that had already been scheduled this step.
        """
        returned = 0
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_table)
        while not self.blocks.can_allocate(need):
            victim = self.running.pop()
            for j, s in enumerate(out.scheduled):
                if s.seq is victim:
                    returned += out.scheduled.pop(j).num_tokens
                    break
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                break
        return returned

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[i]
            if self._waits_for_first_sample(seq):
                i += 1
                continue
            first_time = not seq.admitted  # each sample counts once in the cache stats (not again after preemption)
            hits = self.blocks.cached_prefix(seq, self._cacheable_tokens(seq))
            computed = len(hits) * self.blocks.block_size
            n = seq.num_tokens - computed
            if n > budget:
                # Without chunked prefill a prompt runs whole; a recomputed sequence may exceed
                # the budget though (prompt + output), so it is still chunked.
                if not self.config.enable_chunked_prefill and seq.num_preemptions == 0:
                    break
                n = budget
            need = self.blocks.blocks_for(computed + n) - len(hits)
            if not self.blocks.can_allocate(need, hits):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.pop(i)
            self.blocks.take_prefix(seq, hits)
            self.blocks.grow(seq, computed + n)
            seq.num_computed_tokens = computed
            if first_time:
                seq.admitted = True
                seq.num_cached_tokens = computed
                self.prefix_cache_queries += seq.num_prompt_tokens
                self.prefix_cache_hits += computed
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = time.time()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            out.scheduled.append(ScheduledSequence(seq, computed, n))
            budget -= n

    def _waits_for_first_sample(self, seq: Sequence) -> bool:
        """Samples 1..n-1 of a request start once sample 0 has computed the prompt: its full blocks
        are then in the prefix cache, so the prompt is computed once, not n times (each later
        sample computes only the prompt's last, partial block)."""
        if seq.index == 0 or not self.blocks.enable_prefix_caching:
            return False
        first = seq.request.sequences[0]
        return not first.is_finished and first.num_computed_tokens < first.num_prompt_tokens

    @staticmethod
    def _cacheable_tokens(seq: Sequence) -> int:
        """How many leading tokens may come from the prefix cache instead of being computed."""
        limit = seq.num_tokens - 1  # the last token is always computed: its logits are sampled
        request = seq.request
        if request.wants_prompt_logprobs and seq.index == 0:  # sample 0 scores every prompt token
            limit = min(limit, request.num_scored_prompt_tokens - 1)
        return limit

    def update(self, out: SchedulerOutput) -> None:
        """After the forward: the scheduled tokens are in the cache; publish their full blocks."""
        block_size = self.blocks.block_size
        for s in out.scheduled:
            s.seq.num_computed_tokens = s.end
            if s.end // block_size > s.seq.num_registered_blocks:  # a block was completed
                # With async scheduling the last input may be a token not read back yet: a block
                # is published (hashed) only once all of its tokens are known.
                self.blocks.register(s.seq, min(s.end, s.seq.num_known_tokens))
