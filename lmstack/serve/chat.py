"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request.

The template is the tokenizer's own (rendered in jinja2's sandbox by `lmstack.tokenizer`),
so the prompt is what the model was trained on. Streaming follows OpenAI's chunk sequence:
a first delta with the role, content deltas, a last one with `finish_reason`, an optional
usage chunk (`stream_options.include_usage`), then `data: [DONE]`. A reply stopped by the
content filter ends with finish_reason `content_filter` and the reason in `refusal`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lmstack.errors import LmstackError
from lmstack.serve.errors import APIError, bad_request, short
from lmstack.serve.generation import SSE_DONE, PromptRun, SSEResponse, run_prompt, sse, until_disconnected
from lmstack.serve.logprobs import chat_logprobs
from lmstack.serve.params import (
    check_engine_accepts,
    check_messages,
    check_model,
    check_prompt_length,
    encode,
    resolve_max_tokens,
    sampling_params,
)
from lmstack.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
    now,
    random_id,
)

_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template", "documents",
                             "continue_final_message"}


def messages_as_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        d = {"role": m.role, "content": m.text()}
        for key in ("name", "tool_call_id"):
            value = getattr(m, key)
            if value is not None:
                d[key] = value
        if m.tool_calls is not None:
            d["tool_calls"] = [_parsed_arguments(call, f"messages[{i}].tool_calls[{j}]")
                               for j, call in enumerate(m.tool_calls)]
        out.append(d)
    return out


def _parsed_arguments(call: Any, where: str) -> Any:
    """A tool call with its `function.arguments` as a dict. OpenAI's clients send the arguments as a
    JSON string, tool-use templates (Llama 3.1, Qwen2.5, ...) print them as an object: passed as a
    string they would be shown to the model double-encoded. vLLM parses them the same way."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:  # "" (a call without arguments, as some clients send it) is {}
        arguments = json.loads(function["arguments"]) if function["arguments"].strip() else {}
    except json.JSONDecodeError as err:
        raise bad_request(f"{where}.function.arguments is not valid JSON ({err.msg} at character {err.pos}); send "
                          "the arguments as a JSON object string", param="messages") from None
    return {**call, "function": {**function, "arguments": arguments}}


def render_chat(state: Any, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, tools: list[dict] | None = None,
                template_kwargs: dict[str, Any] | None = None, chat_template: str | None = None) -> str:
    """The prompt text for `messages`; 400 when the template refuses them.

    chat_template: the request's own template (vLLM's field), run only on a server started with
    --trust-request-chat-template: it is code from the client, sandboxed but costly to render."""
    if chat_template is not None and not state.config.trust_request_chat_template:
        raise bad_request("chat_template was sent with the request, but this server does not run templates from "
                          "requests; leave the field out to use the model's template, or start the server with "
                          "--trust_request_chat_template true", param="chat_template")
    kwargs = dict(template_kwargs or {})
    clash = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {clash}; use the request fields instead",
                          param="chat_template_kwargs")
    dicts = messages_as_dicts(messages)
    if continue_final_message and (dicts[-1]["role"] != "assistant" or not dicts[-1]["content"].strip()):
        raise bad_request("continue_final_message needs a final assistant message with content", param="messages")
    try:
        # continue_final_message: the tokenizer cuts the text right after the final message, as transformers
        text = state.tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt, tools=tools,
                                                   chat_template=chat_template,
                                                   continue_final_message=continue_final_message, **kwargs)
    except LmstackError as err:
        whose = "the request's chat_template" if chat_template is not None else "the chat template"
        raise bad_request(f"{whose} could not render these messages: {err}",
                          param="chat_template" if chat_template is not None else "messages") from None
    return text


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.response_format is not None and req.response_format.type != "text":
        raise bad_request(f"response_format {req.response_format.type!r} is not supported (no constrained decoding "
                          "yet); use 'text'", param="response_format", code="unsupported_parameter")
    # The server does not parse tool calls out of the reply. As vLLM without a tool-call parser:
    # only tool_choice="none" is served (the tools reach the model through its chat template and
    # the reply is text); "auto" (the default when tools are given) would return a model's call as
    # plain content, which clients read as "no tool called".
    # Without tools there is nothing to call, so "auto" (which some clients always send) is harmless.
    choice = req.tool_choice if req.tool_choice is not None or not req.tools else "auto"
    if choice is not None and choice != "none" and not (choice == "auto" and not req.tools):
        raise bad_request(f"tool_choice {short(choice)} is not supported: this server does not parse tool calls out "
                          "of the reply (no tool_calls are returned); pass tool_choice='none' to show the tools to "
                          "the model through its chat template and get its reply as text", param="tool_choice",
                          code="unsupported_parameter")
    if req.prompt_logprobs is not None:
        raise bad_request("prompt_logprobs is not supported on chat completions; use /v1/completions with the "
                          "rendered prompt (POST /tokenize gives its token ids)", param="prompt_logprobs",
                          code="unsupported_parameter")


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    refusal: str | None = None
    started: bool = False


async def render_chat_async(state: Any, messages: list[ChatMessage], **kwargs: Any) -> str:
    """`render_chat` off the event loop (a template over long messages takes a while)."""
    check_messages(messages)
    return await asyncio.to_thread(render_chat, state, messages, **kwargs)


async def _plan(state: Any, req: ChatCompletionRequest, request_id: str) -> PromptRun:
    _check_unsupported(req)
    check_messages(req.messages)
    safety = state.config.safety
    if safety is not None:
        violation = safety.check_input_texts([m.text() for m in req.messages])
        if violation is not None:
            state.metrics.safety_refusal("input", violation.category)
            raise APIError(400, violation.user_message(), param="messages", code="content_filter")
    tools = req.tools  # tool_choice is 'none' here (checked above): shown to the model, its reply is text
    text = await render_chat_async(state, req.messages, add_generation_prompt=req.add_generation_prompt,
                                   continue_final_message=req.continue_final_message, tools=tools,
                                   template_kwargs=req.chat_template_kwargs, chat_template=req.chat_template)
    ids = await encode(state, text, "messages", add_special_tokens=False, max_tokens=state.engine.max_model_len)
    check_prompt_length(state, len(ids), param="messages")
    if req.max_completion_tokens is not None:
        max_tokens = resolve_max_tokens(state, len(ids), req.max_completion_tokens, "max_completion_tokens")
    else:
        max_tokens = resolve_max_tokens(state, len(ids), req.max_tokens, "max_tokens")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(state, req, max_tokens, logprobs=logprobs)
    if req.stream:  # a non-streamed request gets the engine's 400 from the engine itself
        check_engine_accepts(state, ids, params)
    return PromptRun(request_id, ids, params)


def _usage(run: PromptRun) -> UsageInfo:
    p, c = len(run.prompt_token_ids), run.num_generated
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def create_chat_completion(state: Any, req: ChatCompletionRequest, request: Request) -> Response:
    model = check_model(state, req.model)
    state.require_engine()
    request_id = random_id("chatcmpl")
    run = await _plan(state, req, request_id)
    created = now()
    deadline = time.monotonic() + state.config.limits.request_timeout
    ticket = state.admit(1)
    if req.stream:
        return SSEResponse(_stream(state, req, run, created, model, deadline, ticket), on_close=ticket.close)
    with ticket:
        choices = await until_disconnected(request, _collect(state, req, run, ticket, deadline))
    body = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=_usage(run))
    return JSONResponse(body.model_dump())


async def _collect(state: Any, req: ChatCompletionRequest, run: PromptRun, ticket: Any,
                   deadline: float) -> list[ChatChoice]:
    choices = [_Choice() for _ in range(req.n)]
    async for update in run_prompt(state, run, ticket, deadline):
        for d in update.deltas:
            c = choices[d.index]
            c.text += d.text
            c.token_ids += d.token_ids
            if req.logprobs:
                c.logprobs += chat_logprobs(state.texts, d.token_ids, d.logprobs or [], d.top_logprobs,
                                            req.top_logprobs or 0)
            if d.finish_reason is not None:
                c.finish_reason, c.stop_reason, c.refusal = d.finish_reason, d.stop_reason, d.refusal
    return [ChatChoice(index=j, message=AssistantMessage(content=c.text, refusal=c.refusal),
                       logprobs=ChatLogprobs(content=c.logprobs) if req.logprobs else None,
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for j, c in enumerate(choices)]


async def _stream(state: Any, req: ChatCompletionRequest, run: PromptRun, created: int, model: str,
                  deadline: float, ticket: Any):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options.continuous_usage_stats)

    head = (f'data: {{"id":"{run.request_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(model)},')

    generated = [0] * req.n  # tokens per choice so far: continuous usage is per choice, as vLLM's

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | dict | None = None) -> str:
        # The shape of ChatCompletionChunk, built without a pydantic object per token.
        if usage is None and continuous:
            p, c = len(run.prompt_token_ids), sum(generated[ch.index] for ch in choices)
            usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        out = []
        for c in choices:
            out.append({"index": c.index, "delta": {k: v for k, v in (("role", c.delta.role), ("content", c.delta.content),
                        ("refusal", c.delta.refusal)) if v is not None},
                        "logprobs": c.logprobs.model_dump() if c.logprobs is not None else None,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return (f'{head}"choices":{json.dumps(out)},"system_fingerprint":null,'
                f'"usage":{json.dumps(usage.model_dump() if isinstance(usage, UsageInfo) else usage)}}}\n\n')

    try:
        # The role comes first, before any token: clients show the turn starting at once.
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
                     for j in range(req.n)])
        async for update in run_prompt(state, run, ticket, deadline):
            for d in update.deltas:
                generated[d.index] += len(d.token_ids)
                logprobs = None
                if req.logprobs and d.token_ids:
                    logprobs = ChatLogprobs(content=chat_logprobs(state.texts, d.token_ids, d.logprobs or [],
                                                                  d.top_logprobs, req.top_logprobs or 0))
                if not (d.text or logprobs or d.finish_reason):
                    continue
                delta = DeltaMessage(content=d.text or None, refusal=d.refusal)
                yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs,
                                             finish_reason=d.finish_reason, stop_reason=d.stop_reason)])
        ticket.close()
        if include_usage:
            yield chunk([], _usage(run))
    except APIError as err:
        state.metrics.error(err.status)
        yield sse(json.dumps(err.body()))
    yield SSE_DONE
