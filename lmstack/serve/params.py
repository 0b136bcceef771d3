"""OpenAI request fields -> `SamplingParams`, with every model-dependent check done up front.

The schema (protocol.py) has already checked types and fixed ranges; here we check what
depends on the model and the server's limits (context length, vocabulary, `n`, stop strings)
and answer with a 400 naming the field, before the engine sees anything.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lmstack.errors import ConfigError, LmstackError
from lmstack.infer.params import SamplingParams
from lmstack.serve.errors import APIError, bad_request, check_text, short


def check_model(state: Any, model: str | None) -> str:
    """The served model's name; 404 (as OpenAI and vLLM: the client raises NotFoundError) for a name
    this server does not serve."""
    names = state.config.model_names
    if model is None or model == "" or model in names:
        return names[0]
    raise APIError(404, f"the model {short(model)} does not exist on this server; it serves {names}",
                   param="model", code="model_not_found")


def as_batch(state: Any, value: Any, param: str, noun: str) -> list:
    """One text / token-id list or a list of them -> a non-empty list within the server's max_prompts."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        value = [value]
    if not value:
        raise bad_request(f"{param} is an empty list; give at least one {noun}", param=param)
    limit = state.config.limits.max_prompts
    if len(value) > limit:
        raise bad_request(f"{len(value)} {param}s in one request; this server allows at most {limit}", param=param)
    return value


def check_prompt_length(state: Any, num_tokens: int, param: str = "prompt", max_tokens: int | None = None) -> None:
    limit = state.engine.max_model_len
    if num_tokens == 0:
        raise bad_request("the prompt is empty after tokenization; give at least one token", param=param)
    if num_tokens > limit or (num_tokens == limit and max_tokens != 0):
        why = "leaving no room to generate" if num_tokens == limit else "more than it can hold"
        hint = " (max_tokens=0 scores a prompt as long as the context)" if num_tokens == limit else ""
        raise bad_request(f"the prompt has {num_tokens} tokens but this model's context (max_model_len) is {limit} "
                          f"tokens, {why}; shorten the prompt{hint}", param=param, code="context_length_exceeded")


def check_text_fits(state: Any, text: str, param: str, max_tokens: int) -> None:
    """Refuse, before tokenizing it, a text so long that it cannot be `max_tokens` tokens or fewer.

    Uses the tokenizer's bound on characters per token (None: no bound, nothing refused here).
    """
    per_token = state.texts.max_chars_per_token() if state.texts is not None else None
    if per_token is not None and len(text) > max_tokens * per_token:
        raise bad_request(f"the {param} has {len(text)} characters, more than the {max_tokens} tokens of this model's "
                          f"context (max_model_len={state.engine.max_model_len}) can hold (a token here is at most "
                          f"{per_token} characters); shorten it", param=param, code="context_length_exceeded")


async def encode(state: Any, text: str, param: str, *, add_special_tokens: bool,
                 max_tokens: int | None = None) -> list[int]:
    """Tokenize a client's text off the event loop; 400 naming `param` for text the tokenizer refuses.

    max_tokens: when given, a text that can never be that few tokens is refused at once.
    """
    check_text(text, param)
    if max_tokens is not None:
        check_text_fits(state, text, param, max_tokens)
    tok = state.tokenizer
    try:
        if len(text) < 4096:  # a thread hop costs more than tokenizing a short text
            return tok.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(_encode_long, tok, text, add_special_tokens)
    except LmstackError as err:
        raise bad_request(f"{param} could not be tokenized: {err}", param=param) from None


def _encode_long(tok: Any, text: str, add_special_tokens: bool) -> list[int]:
    # `tokenizers` holds the GIL through `encode` but releases it in `encode_batch`: only the
    # latter lets the event loop (and every other request) run while megabytes are tokenized.
    batch = getattr(tok, "encode_batch", None)
    if batch is None:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    return batch([text], add_special_tokens=add_special_tokens)[0]


def check_messages(messages: list[Any], param: str = "messages") -> None:
    """400 for a lone surrogate in any message's text (content, text parts, name)."""
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            check_text(m.content, param, f"{param}[{i}].content")
        elif isinstance(m.content, list):
            for j, part in enumerate(m.content):
                check_text(part.text, param, f"{param}[{i}].content[{j}].text")
        if m.name is not None:
            check_text(m.name, param, f"{param}[{i}].name")


def resolve_max_tokens(state: Any, num_prompt_tokens: int, requested: int | None, param: str) -> int:
    """`requested` checked against the context; None fills what the context leaves."""
    room = state.engine.max_model_len - num_prompt_tokens
    if requested is None:
        return room
    if requested > room:
        raise bad_request(f"{param}={short(requested)} is beyond the context: the prompt has {num_prompt_tokens} tokens and "
                          f"max_model_len is {state.engine.max_model_len}, so {param} can be at most {room}",
                          param=param, code="context_length_exceeded")
    return requested


def _logit_bias(state: Any, bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias key {short(key)} is not a token id (keys are token ids as strings)",
                              param="logit_bias") from None
        if not 0 <= token < state.engine.vocab_size:
            raise bad_request(f"logit_bias token id {short(token)} is outside the vocabulary [0, {state.engine.vocab_size})",
                              param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise bad_request(f"logit_bias value {value} for token {token} must be in [-100, 100]", param="logit_bias")
        out[token] = float(value)
    return out


def _stop(state: Any, stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > state.config.limits.max_stop:
        raise bad_request(f"stop has {len(stops)} strings; this server allows at most {state.config.limits.max_stop}",
                          param="stop")
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", param="stop")
    longest = state.config.limits.max_stop_chars
    for i, s in enumerate(stops):
        if len(s) > longest:
            where = "stop" if isinstance(stop, str) else f"stop[{i}]"
            raise bad_request(f"{where} has {len(s)} characters; this server allows at most {longest} characters "
                              "per stop string", param="stop")
    return stops or None


def sampling_params(state: Any, req: Any, max_tokens: int, *, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's options for an OpenAI request (completions or chat)."""
    limits = state.config.limits
    if req.n > limits.max_n:
        raise bad_request(f"n={short(req.n)} is above this server's limit of {limits.max_n} samples per prompt", param="n")
    if req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens={short(req.min_tokens)} is larger than max_tokens={max_tokens}", param="min_tokens")
    for tid in req.stop_token_ids or []:
        if tid >= state.engine.vocab_size:
            raise bad_request(f"stop_token_ids entry {short(tid)} is outside the vocabulary [0, {state.engine.vocab_size})",
                              param="stop_token_ids")
    params = SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(state, req.logit_bias),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=_stop(state, req.stop),
        stop_token_ids=list(req.stop_token_ids) if req.stop_token_ids else None,
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        seed=req.seed,
        skip_special_tokens=req.skip_special_tokens,
    )
    try:
        return params.validate(state.engine.vocab_size)
    except ConfigError as err:
        field = str(err).split("=", 1)[0].strip()
        raise bad_request(str(err), param=field if field.isidentifier() else None) from None


def check_engine_accepts(state: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
    """The engine's own admission checks (context, KV pool), as a 400 before any response starts."""
    try:
        state.engine.validate(prompt_token_ids, params)
    except LmstackError as err:
        from lmstack.serve.generation import engine_error

        raise engine_error(err) from None
