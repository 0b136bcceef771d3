"""The engine against single-prompt `infer.generate`: mixed batches, prefix cache, logprobs, sampling."""

import copy

import pytest
import torch
from engine_helpers import alone, prompts, tiny_model

from lmstack.engine import LLM, EngineConfig, EngineCore, SamplingParams
from lmstack.errors import RequestError

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral"])
def test_mixed_batch_equals_each_prompt_alone(family, overlap):
    """Arrivals over time, prompts longer than the step budget (chunked), a pool too small for all."""
    model = tiny_model(family)
    core = EngineCore(model, config=EngineConfig(block_size=4, num_blocks=20, max_num_batched_tokens=16,
                                                 max_num_seqs=4, async_scheduling=overlap))
    schedule_log = []
    schedule = core.scheduler.schedule

    def logged():
        out = schedule()
        schedule_log.append([(s.start, s.num_tokens, s.seq.num_prompt_tokens) for s in out.scheduled])
        return out

    core.scheduler.schedule = logged
    fed_steps = []
    run = core.runner.run
    core.runner.run = lambda scheduled, keep, fed=None: fed_steps.append(fed is not None) or run(scheduled, keep, fed)
    ps = prompts([3, 9, 26, 14, 5, 33], seed=1)
    max_tokens = [12, 6, 10, 16, 8, 5]
    arrivals = {0: [0, 1, 2], 3: [3, 4], 7: [5]}  # step -> prompts submitted before it
    results, step = {}, 0
    while step <= max(arrivals) or core.has_unfinished():
        for i in arrivals.get(step, []):
            core.add_request(ps[i], SamplingParams(max_tokens=max_tokens[i], **GREEDY), request_id=str(i))
        for out in core.step():
            results[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    stats = core.stats()
    assert stats.num_preemptions_total > 0
    assert any(start > 0 and n > 1 and start < total for step in schedule_log for start, n, total in step)  # chunks
    assert any({n == 1 for _, n, _ in step} == {True, False} for step in schedule_log)  # decode + prefill mixed
    assert stats.kv_blocks_used == 0
    assert any(fed_steps) == overlap  # async: decodes were fed tokens that were still on the device
    for i, p in enumerate(ps):
        assert results[i] == alone(model, p, max_tokens[i]).outputs[0].token_ids, f"request {i}"


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_prefix_cache_computes_only_uncached_tokens(overlap):
    model = tiny_model("qwen3")
    bs = 4
    core = EngineCore(model, config=EngineConfig(block_size=bs, num_blocks=64, async_scheduling=overlap))
    shared, tail_a, tail_b = prompts([3 * bs, 5, 7], seed=2)
    params = SamplingParams(max_tokens=6, **GREEDY)
    core.add_request(shared + tail_a, params)
    while core.has_unfinished():
        core.step()
    before = core.stats()
    b = shared + tail_b
    core.add_request(b, params)
    outs = []
    while core.has_unfinished():
        outs += core.step()
    after = core.stats()
    # Only the 7 uncached prompt tokens are prefilled, then one token per decode step.
    assert after.computed_tokens_total - before.computed_tokens_total == len(tail_b) + (6 - 1)
    assert outs[0].num_cached_tokens == 3 * bs
    assert after.prefix_cache_hits_total - before.prefix_cache_hits_total == 3 * bs
    assert outs[0].outputs[0].token_ids == alone(model, b, 6).outputs[0].token_ids


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_prompt_logprobs_equal_full_forward(overlap):
    model = tiny_model("llama")
    llm = LLM(model, block_size=4, num_blocks=64, max_num_batched_tokens=8,  # the prompt is cut into chunks
              async_scheduling=overlap)
    (prompt,) = prompts([30], seed=3)
    llm.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))  # its blocks are now cached
    out = llm.generate([prompt], SamplingParams(max_tokens=4, prompt_logprobs=3, logprobs=2, **GREEDY))[0]
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + generated])).logits[0].float(), dim=-1)
    expected = full[:-1].gather(1, torch.tensor(prompt + generated)[1:, None]).squeeze(1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    assert torch.allclose(torch.tensor(out.prompt_logprobs[1:]), expected[: len(prompt) - 1], atol=1e-4, rtol=0)
    top = full[: len(prompt) - 1].topk(3, dim=-1)
    for t, alternatives in enumerate(out.prompt_top_logprobs[1:]):
        assert list(alternatives) == top.indices[t].tolist()
        assert torch.allclose(torch.tensor(list(alternatives.values())), top.values[t], atol=1e-4, rtol=0)
    gen_lp = torch.tensor(out.outputs[0].logprobs)
    assert torch.allclose(gen_lp, expected[len(prompt) - 1:], atol=1e-4, rtol=0)
    assert all(len(t) == 2 for t in out.outputs[0].top_logprobs)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_max_tokens_0_scores_a_full_context_prompt_beside_generating_ones(overlap):
    """Scoring only (what eval harnesses send): prompt logprobs of a prompt filling the whole
    context, computed in chunks beside ordinary requests, which are unaffected; nothing generated."""
    model = tiny_model("llama")
    limit = model.config.max_position_embeddings
    llm = LLM(model, block_size=4, num_blocks=80, max_num_batched_tokens=48, async_scheduling=overlap)
    full, a, b = prompts([limit, 9, 20], seed=5)
    score = SamplingParams(max_tokens=0, prompt_logprobs=2)
    outs = llm.generate([a, full, b], [SamplingParams(max_tokens=7, **GREEDY), score,
                                       SamplingParams(max_tokens=5, **GREEDY)])
    scored = outs[1]
    assert scored.outputs[0].token_ids == [] and scored.outputs[0].finish_reason == "length"
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
    expected = ref[:-1].gather(1, torch.tensor(full)[1:, None]).squeeze(1)
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == limit
    assert (torch.tensor(scored.prompt_logprobs[1:], dtype=torch.float64) - expected).abs().max() < 1e-4
    assert [list(t) for t in scored.prompt_top_logprobs[1:]] == ref[:-1].topk(2, dim=-1).indices.tolist()
    assert outs[0].outputs[0].token_ids == alone(model, a, 7).outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == alone(model, b, 5).outputs[0].token_ids
    assert llm.engine.stats().kv_blocks_used == 0
    with pytest.raises(RequestError, match="max_tokens=0 scores a prompt of up to max_model_len tokens"):
        llm.generate([full], SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match=f"the prompt has {limit + 1} tokens but max_model_len is {limit}"):
        llm.generate([full + [1]], score)


def test_sampling_options_match_infer_generate():
    """Seeded sampling with penalties gives infer.generate's tokens, alone or sharing a batch (n=2)."""
    model = tiny_model("qwen2")
    ps = prompts([6, 11, 4], seed=4)
    options = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.3, min_tokens=3, seed=11, ignore_eos=False)
    llm = LLM(model, block_size=4, num_blocks=64)
    outs = llm.generate(ps, [SamplingParams(max_tokens=10, n=2, **options), SamplingParams(max_tokens=7, **GREEDY),
                             SamplingParams(max_tokens=9, temperature=1.0, seed=3)])
    ref = alone(model, ps[0], 10, n=2, **options)
    assert [c.token_ids for c in outs[0].outputs] == [c.token_ids for c in ref.outputs]
    assert outs[0].outputs[0].token_ids != outs[0].outputs[1].token_ids
    ref2 = alone(model, ps[2], 9, temperature=1.0, seed=3, ignore_eos=False)
    assert outs[2].outputs[0].token_ids == ref2.outputs[0].token_ids
    overlapped = LLM(model, block_size=4, num_blocks=64, async_scheduling=True)  # no penalties: overlapped steps
    outs = overlapped.generate(ps[1:], [SamplingParams(max_tokens=7, **GREEDY), SamplingParams(max_tokens=9,
                                                                                               temperature=1.0, seed=3)])
    assert overlapped.engine.async_scheduling and outs[1].outputs[0].token_ids == ref2.outputs[0].token_ids


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_stop_token_ids_and_finish_reasons(overlap):
    model = tiny_model("gpt2")
    (prompt,) = prompts([8], seed=5)
    greedy = alone(model, prompt, 8).outputs[0].token_ids
    stop = greedy[3]
    first = greedy.index(stop)
    llm = LLM(model, block_size=4, num_blocks=32, async_scheduling=overlap)
    a, b = llm.generate([prompt, prompt], [SamplingParams(max_tokens=8, stop_token_ids=[stop], **GREEDY),
                                           SamplingParams(max_tokens=8, **GREEDY)])
    assert a.outputs[0].token_ids == greedy[: first + 1]
    assert (a.outputs[0].finish_reason, a.outputs[0].stop_reason) == ("stop", stop)
    assert (b.outputs[0].token_ids, b.outputs[0].finish_reason) == (greedy, "length")
    assert llm.stats().requests_finished_total == {"stop": 1, "length": 1}
    assert llm.stats().kv_blocks_used == 0 and not llm.engine.has_unfinished()


def _text_setup():
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["the cat sat on the mat. a dog ran to the park!"] * 20, 300,
                                special_tokens=["<|eos|>"], bos_token=None, pad_token=None)
    return tiny_model("llama", vocab_size=tokenizer.vocab_size), tokenizer


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_text_prompts_and_stop_strings_match_infer_generate(overlap):
    model, tokenizer = _text_setup()
    prompt = "the cat sat on"
    full = alone(model, prompt, 12, tokenizer=tokenizer).outputs[0]
    stop = full.text[len(full.text) // 2:][:3]  # a string that occurs in the greedy continuation
    llm = LLM(model, tokenizer, block_size=4, num_blocks=64, async_scheduling=overlap)
    a, b = llm.generate([prompt, prompt], [SamplingParams(max_tokens=12, **GREEDY),
                                           SamplingParams(max_tokens=12, stop=[stop], **GREEDY)])
    assert (a.prompt, a.outputs[0].text, a.outputs[0].token_ids) == (prompt, full.text, full.token_ids)
    expected = alone(model, prompt, 12, tokenizer=tokenizer, stop=[stop]).outputs[0]
    assert stop not in b.outputs[0].text and b.outputs[0].text == expected.text
    assert (b.outputs[0].finish_reason, b.outputs[0].stop_reason) == ("stop", stop)


@pytest.mark.cuda
def test_llm_on_cuda_equals_each_prompt_alone():
    """Triton attention + CUDA graphs, fp32, preemptions; then a pool sized from gpu_memory_utilization."""
    cpu_model = tiny_model("qwen3")
    model = copy.deepcopy(cpu_model).cuda()
    ps = prompts([3, 9, 26, 14, 5, 33], seed=1)
    llm = LLM(model, block_size=4, num_blocks=16, max_num_batched_tokens=16, max_num_seqs=4)  # 16 blocks force preemptions
    assert llm.engine.runner.backend == "triton" and llm.engine.runner.graphs
    outs = llm.generate(ps, SamplingParams(max_tokens=10, **GREEDY))
    assert llm.stats().num_preemptions_total > 0
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == alone(cpu_model, p, 10).outputs[0].token_ids
    sized = LLM(model, gpu_memory_utilization=0.3, block_size=256, max_num_seqs=16)
    assert sized.stats().kv_blocks_total > 100
    again = sized.generate(ps, SamplingParams(max_tokens=10, **GREEDY))
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("option", [dict(repetition_penalty=1.2), dict(min_tokens=2), dict(presence_penalty=0.5)])
def test_a_request_needing_token_counts_finishing_beside_others_under_async_scheduling(option):
    """Its sampling flags must leave with it: the survivors' steps overlap again and have no
    host copy of their newest token to count (this crashed the engine for every request)."""
    model = tiny_model("llama")
    a, b = prompts([5, 7], seed=4)
    llm = LLM(model, block_size=4, num_blocks=64, async_scheduling=True)
    outs = llm.generate([a, b], [SamplingParams(max_tokens=3, **GREEDY, **option), SamplingParams(max_tokens=12, **GREEDY)])
    assert outs[0].outputs[0].token_ids == alone(model, a, 3, **option).outputs[0].token_ids
    assert outs[1].outputs[0].token_ids == alone(model, b, 12).outputs[0].token_ids
    assert llm.engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_n_samples_compute_the_prompt_once(overlap):
    """Samples 1..n-1 start once sample 0 has computed the prompt and reuse its cached blocks;
    each sample still equals a request of its own with seed + j."""
    model = tiny_model("llama")
    (prompt,) = prompts([64], seed=1)
    params = SamplingParams(n=4, max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    llm = LLM(model, block_size=4, num_blocks=256, async_scheduling=overlap)
    out = llm.generate([prompt], params)[0]
    stats = llm.engine.stats()
    # sample 0: 64 prompt tokens; samples 1-3: the last (partial) 4-token block each; then 4 decodes x 4 samples
    assert stats.computed_tokens_total == 64 + 3 * 4 + 4 * 4
    assert out.num_cached_tokens == 0  # nothing came from an earlier request
    # as vLLM counts n samples (n requests there): every sample queries its prompt, 1..3 hit 60 tokens each
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (4 * 64, 3 * 60)
    for j, sample in enumerate(out.outputs):
        assert sample.token_ids == alone(model, prompt, 5, temperature=1.0, seed=7 + j).outputs[0].token_ids
    no_cache = LLM(model, block_size=4, num_blocks=256, enable_prefix_caching=False, async_scheduling=overlap)
    assert [o.token_ids for o in no_cache.generate([prompt], params)[0].outputs] == [o.token_ids for o in out.outputs]
    assert no_cache.engine.stats().computed_tokens_total == 4 * 64 + 4 * 4


def test_a_one_token_prompt_has_prompt_logprobs_of_one_null_entry():
    model = tiny_model("llama")
    out = LLM(model, block_size=4, num_blocks=16).generate([[7]], SamplingParams(max_tokens=2, prompt_logprobs=1,
                                                                                 **GREEDY))[0]
    reference = alone(model, [7], 2, prompt_logprobs=1)
    assert out.prompt_logprobs == reference.prompt_logprobs == [None]
    assert out.prompt_top_logprobs == [None]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_without_chunked_prefill_prompts_run_whole_and_too_long_ones_are_refused(overlap):
    """enable_chunked_prefill=False: a prompt longer than max_num_batched_tokens can never run, so
    it is refused up front with what to change; the others each run in one piece (a prompt that
    does not fit what is left of a step's budget waits for a later step) and give infer.generate's
    tokens."""
    model = tiny_model("llama")
    llm = LLM(model, block_size=4, num_blocks=64, max_num_batched_tokens=16, max_num_seqs=4,
              enable_chunked_prefill=False, async_scheduling=overlap)
    ps = prompts([3, 9, 16, 14, 5, 12, 17], seed=6)
    params = SamplingParams(max_tokens=6, **GREEDY)
    with pytest.raises(RequestError, match=r"^prompt 6: the prompt has 17 tokens, more than max_num_batched_tokens=16, "
                                           r"and chunked prefill is off; shorten the prompt, raise "
                                           r"max_num_batched_tokens or set enable_chunked_prefill=True$"):
        llm.generate(ps, params)
    assert not llm.engine.has_unfinished()  # the batch was refused as a whole
    with pytest.raises(RequestError, match="^the prompt has 17 tokens, more than max_num_batched_tokens=16"):
        llm.engine.add_request(ps[6], params)

    schedule_log = []
    schedule = llm.engine.scheduler.schedule

    def logged():
        out = schedule()
        schedule_log.append([(s.start, s.num_tokens, s.seq.num_prompt_tokens, s.seq.num_preemptions)
                             for s in out.scheduled])
        return out

    llm.engine.scheduler.schedule = logged
    outs = llm.generate(ps[:6], params)
    assert llm.stats().num_preemptions_total == 0  # the pool holds every sequence: only chunking could cut a prompt
    prefills = [(start, n, total) for step in schedule_log for start, n, total, _ in step if n > 1]
    assert sorted(total for _, _, total in prefills) == sorted(len(p) for p in ps[:6])  # one piece per prompt
    assert all(start == 0 and n == total for start, n, total in prefills), prefills
    assert all(sum(n for _, n, _, _ in step) <= 16 for step in schedule_log)
    # the 16-token prompt did not fit beside the first prompts or their decodes: it waited for a whole step
    first = next(i for i, step in enumerate(schedule_log) if any(total == 16 for _, _, total, _ in step))
    assert first > 0 and schedule_log[first] == [(0, 16, 16, 0)], schedule_log[:first + 1]
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == alone(model, p, 6).outputs[0].token_ids
    assert llm.stats().kv_blocks_used == 0
