"""POST /v1/completions: text or token-id prompts, one or many, streamed or not.

Each prompt is one engine request with `n` samples; choice `i * n + j` is sample j of prompt
i, as in OpenAI's API. `echo` puts the prompt in front of the text and, with `logprobs`, the
prompt tokens' log-probabilities (the first is null) in front of the generated ones: what
evaluation harnesses use to score a continuation. `max_tokens=0` returns only that.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lmstack.serve.errors import APIError, bad_request
from lmstack.serve.generation import (
    SSE_DONE,
    PromptRun,
    SSEResponse,
    Update,
    merge,
    run_prompt,
    sse,
    until_disconnected,
)
from lmstack.serve.logprobs import completion_logprobs, prompt_logprobs_vllm
from lmstack.serve.params import (
    as_batch,
    check_engine_accepts,
    check_model,
    check_prompt_length,
    encode,
    resolve_max_tokens,
    sampling_params,
)
from lmstack.serve.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    now,
    random_id,
)


@dataclass
class _Prompt:
    token_ids: list[int]
    text: str  # what echo shows: the given text, or the decoded ids
    run: PromptRun


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    offset: int = 0  # text_offset of the next token (streaming)


async def _prompts(state: Any, prompt: Any, add_special_tokens: bool) -> list[tuple[list[int], str]]:
    """(ids, text) per prompt, whatever form `prompt` came in; text is tokenized off the event loop."""
    tok = state.tokenizer
    prompt = as_batch(state, prompt, "prompt", "prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids = await encode(state, p, "prompt", add_special_tokens=add_special_tokens,
                               max_tokens=state.engine.max_model_len)
            out.append((ids, p))
        else:
            vocab = state.engine.vocab_size
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                where = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
                raise bad_request(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
            out.append((list(p), tok.decode(p, skip_special_tokens=False)))
    return out


async def _plan(state: Any, req: CompletionRequest, request_id: str) -> list[_Prompt]:
    if req.suffix:
        raise bad_request("suffix is not supported by this server", param="suffix", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of={req.best_of} is not supported (only best_of == n)", param="best_of",
                          code="unsupported_parameter")
    if req.echo and req.prompt_logprobs is not None and req.logprobs is not None \
            and req.prompt_logprobs != req.logprobs:
        raise bad_request("with echo, prompt_logprobs must equal logprobs", param="prompt_logprobs")
    if req.stream and req.prompt_logprobs is not None:  # as vLLM
        raise bad_request("prompt_logprobs is not available with stream=true (use echo with logprobs, or do not "
                          "stream)", param="prompt_logprobs", code="unsupported_parameter")
    prompts = await _prompts(state, req.prompt, req.add_special_tokens)
    safety = state.config.safety
    if safety is not None:
        violation = safety.check_input_texts([text for _, text in prompts])
        if violation is not None:
            state.metrics.safety_refusal("input", violation.category)
            raise APIError(400, violation.user_message(), param="prompt", code="content_filter")
    plan = []
    for i, (ids, text) in enumerate(prompts):
        check_prompt_length(state, len(ids), max_tokens=req.max_tokens)
        max_tokens = resolve_max_tokens(state, len(ids), req.max_tokens, "max_tokens")
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else req.prompt_logprobs
        params = sampling_params(state, req, max_tokens, logprobs=req.logprobs,
                                 prompt_logprobs=prompt_logprobs)
        if req.stream:  # a non-streamed request gets the engine's 400 from the engine itself
            check_engine_accepts(state, ids, params)
        plan.append(_Prompt(ids, text, PromptRun(f"{request_id}-{i}", ids, params)))
    return plan


def _usage(plan: list[_Prompt]) -> UsageInfo:
    prompt = sum(len(p.token_ids) for p in plan)
    completion = sum(p.run.num_generated for p in plan)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _echo_logprobs(state: Any, p: _Prompt, update: Update, offset: int = 0):
    plp = list(update.prompt_logprobs or [None] * len(p.token_ids))
    top = update.prompt_top_logprobs
    return completion_logprobs(state.texts, p.token_ids, plp, top, offset)


def _apply(choice: _Choice, d: Any) -> None:
    choice.text += d.text
    choice.token_ids += d.token_ids
    choice.logprobs += d.logprobs or []
    choice.top += d.top_logprobs or []
    if d.finish_reason is not None:
        choice.finish_reason, choice.stop_reason = d.finish_reason, d.stop_reason


async def _collect(state: Any, req: CompletionRequest, plan: list[_Prompt], ticket: Any, deadline: float):
    n = req.n
    choices = [_Choice() for _ in range(len(plan) * n)]
    first: dict[int, Update] = {}
    async for i, update in merge([run_prompt(state, p.run, ticket, deadline) for p in plan]):
        first.setdefault(i, update)
        if update.prompt_logprobs is not None:
            first[i] = update
        for d in update.deltas:
            _apply(choices[i * n + d.index], d)
    out = []
    for i, p in enumerate(plan):
        prompt_lp = None  # the same for every sample of the prompt
        if req.prompt_logprobs is not None and i in first:
            prompt_lp = prompt_logprobs_vllm(state.texts, p.token_ids, first[i].prompt_logprobs,
                                             first[i].prompt_top_logprobs)
        for j in range(n):
            c = choices[i * n + j]
            text = (p.text + c.text) if req.echo else c.text
            logprobs = None
            if req.logprobs is not None:
                lp = completion_logprobs(state.texts, c.token_ids, c.logprobs, c.top, len(p.text) if req.echo else 0)
                if req.echo and i in first:
                    head = _echo_logprobs(state, p, first[i])
                    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(head, name).extend(getattr(lp, name))
                    lp = head
                logprobs = lp
            out.append(CompletionChoice(index=i * n + j, text=text, logprobs=logprobs, prompt_logprobs=prompt_lp,
                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return out


async def create_completion(state: Any, req: CompletionRequest, request: Request) -> Response:
    model = check_model(state, req.model)
    state.require_engine()
    request_id = random_id("cmpl")
    plan = await _plan(state, req, request_id)
    created = now()
    deadline = time.monotonic() + state.config.limits.request_timeout
    ticket = state.admit(len(plan))
    if req.stream:
        return SSEResponse(_stream(state, req, plan, request_id, created, model, deadline, ticket),
                           on_close=ticket.close)
    with ticket:
        choices = await until_disconnected(request, _collect(state, req, plan, ticket, deadline))
    body = CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=_usage(plan))
    return JSONResponse(body.model_dump())


async def _stream(state: Any, req: CompletionRequest, plan: list[_Prompt], request_id: str, created: int,
                  model: str, deadline: float, ticket: Any):
    n = req.n
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
    choices = [_Choice() for _ in range(len(plan) * n)]
    echoed: set[int] = set()

    # One chunk per token and stream: built from a fixed prefix with json.dumps, the shape of
    # CompletionResponse (tests parse it with the openai client), without a pydantic object each time.
    # JSON stays ASCII (\uXXXX escapes): clients that split lines like str.splitlines() (httpx's
    # iter_lines) would otherwise break an event at U+2028 or U+0085 inside generated text.
    head = f'data: {{"id":"{request_id}","object":"text_completion","created":{created},"model":{json.dumps(model)},'

    def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None, stop: Any = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs.model_dump() if logprobs is not None else None,
                  "finish_reason": finish, "stop_reason": stop}
        usage = None
        if continuous:  # this choice's prompt and its tokens so far, as vLLM reports them
            p, c = len(plan[index // n].token_ids), len(choices[index].token_ids)
            usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}  # UsageInfo's shape
        return (f'{head}"choices":[{json.dumps(choice)}],"system_fingerprint":null,'
                f'"usage":{json.dumps(usage)}}}\n\n')

    try:
        async for i, update in merge([run_prompt(state, p.run, ticket, deadline) for p in plan]):
            p = plan[i]
            if req.echo and i not in echoed:
                echoed.add(i)
                for j in range(n):
                    c = choices[i * n + j]
                    lp = _echo_logprobs(state, p, update) if req.logprobs is not None else None
                    c.offset = len(p.text)
                    yield chunk(i * n + j, p.text, lp)
            for d in update.deltas:
                c = choices[i * n + d.index]
                _apply(c, d)
                lp = None
                if req.logprobs is not None and d.token_ids:
                    lp = completion_logprobs(state.texts, d.token_ids, d.logprobs or [], d.top_logprobs, c.offset)
                c.offset += len(d.text)
                if d.text or lp is not None or d.finish_reason is not None:
                    yield chunk(i * n + d.index, d.text, lp, c.finish_reason, c.stop_reason)
        ticket.close()
        if include_usage:
            body = CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=_usage(plan))
            yield sse(body.model_dump_json())
    except APIError as err:
        state.metrics.error(err.status)
        yield sse(_json(err.body()))
    yield SSE_DONE


def _json(body: dict) -> str:
    return json.dumps(body)
