"""Scheduling policy: token budget, decodes before chunks, FCFS with priorities, preemption order."""

from engine_helpers import FakeRunner, prompts, tiny_model

from lmstack.engine import EngineConfig, EngineCore, SamplingParams


def _core(**options):
    model = tiny_model("llama")
    core = EngineCore(model, config=EngineConfig(**{"block_size": 4, "num_blocks": 64, **options}))
    core.runner = FakeRunner(model.config.vocab_size)
    return core


def _drain(core):
    while core.has_unfinished():
        core.step()
    return core.runner.calls


def test_budget_decodes_first_and_chunks_fill_the_rest():
    core = _core(max_num_batched_tokens=10)
    for p in prompts([3, 4, 25]):
        core.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True))
    calls = _drain(core)
    for step in calls:
        sizes = [n for _, _, n in step]
        assert sum(sizes) <= 10
        assert sizes == sorted(sizes, key=lambda n: n != 1)  # single-token decodes lead the batch
    long_chunks = [(start, n) for step in calls for seq, start, n in step if seq.num_prompt_tokens == 25 and n > 1]
    assert len(long_chunks) >= 3 and long_chunks[0][0] == 0  # the 25-token prompt was cut into chunks
    assert all(a + n == b for (a, n), (b, _) in zip(long_chunks, long_chunks[1:]))  # contiguous
    assert sum(n for step in calls for _, _, n in step) == 3 + 4 + 25 + 3 * 5  # nothing computed twice


def test_priorities_order_the_waiting_queue():
    core = _core(max_num_seqs=1)
    ids = {}
    for priority, p in zip([2, 0, 1, 0], prompts([3, 3, 3, 3])):
        ids[core.add_request(p, SamplingParams(max_tokens=2), priority=priority).request_id] = priority
    first_seen = []
    for step in _drain(core):
        for seq, _, _ in step:
            if seq.request.request_id not in first_seen:
                first_seen.append(seq.request.request_id)
    assert [ids[r] for r in first_seen] == [0, 0, 1, 2]
    assert int(first_seen[0]) < int(first_seen[1])  # equal priorities: first come, first served


def test_newest_running_sequence_is_preempted_and_recomputed():
    core = _core(num_blocks=6, max_num_batched_tokens=64)
    requests = [core.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True))
                for p in prompts([4, 4, 4], seed=3)]
    preempted_first = None
    while core.has_unfinished():
        before = {seq.seq_id: seq.num_preemptions for r in requests for seq in r.sequences}
        core.step()
        for r in requests:
            for seq in r.sequences:
                if seq.num_preemptions > before[seq.seq_id] and preempted_first is None:
                    preempted_first = r
    assert preempted_first is requests[-1]  # the newest, not the oldest
    assert core.stats().num_preemptions_total >= 1
    assert all(len(r.sequences[0].output_token_ids) == 12 for r in requests)
    core.blocks.check([])
