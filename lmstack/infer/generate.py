"""`generate`: offline generation for one prompt or a left-padded batch (greedy, sampling, beams).

Every option is checked before the model runs. Sampling and greedy decoding share one loop
(`iter_generate`), which yields each step's text deltas, so `stream` and `generate` produce
the same tokens and text; beam search lives in `beam.py`. The model runs through a
`Decoder` (eager, or the compiled static-cache one on CUDA).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmstack.errors import ConfigError
from lmstack.infer.decoder import Decoder, make_decoder
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.params import GenerationConfig, SamplingParams
from lmstack.infer.sampling import (
    SamplingTensors,
    TokenCounts,
    logprobs_of,
    make_generator,
    process_logits,
    sample,
)
from lmstack.infer.stopping import SequenceState

Prompts = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor


@dataclass
class Plan:
    """A validated request: token prompts, options, EOS ids and the number of tokens to generate."""

    prompts: list[list[int]]
    texts: list[str | None]
    config: GenerationConfig
    eos_token_ids: list[int]
    max_new_tokens: int


def as_token_lists(prompts: Prompts, tokenizer=None) -> tuple[list[list[int]], list[str | None]]:
    """Normalise a str / ids / list of either / (B, T) tensor or array into lists of ids (and their texts).

    Ids may be ints, numpy integers or integer tensors; a prompt may be any sequence of them."""
    if _is_array(prompts):
        prompts = prompts.tolist() if prompts.ndim == 2 else [prompts.tolist()]
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ConfigError(f"prompts must be a string, a list of token ids, or a list of either; got "
                          f"{type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and _is_id(prompts[0]):
        prompts = [prompts]
    ids, texts = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ConfigError("text prompts need a tokenizer: pass tokenizer=... or token ids")
            ids.append(tokenizer.encode(p, add_special_tokens=True))
            texts.append(p)
            continue
        row = _ids_of(p)
        if row is None:
            raise ConfigError(f"prompt {i} is {p!r:.60}; each prompt is a string or a sequence of integer token ids")
        ids.append(row)
        texts.append(None)
    return ids, texts


def _ids_of(prompt) -> list[int] | None:
    """One prompt's ids, or None when it is not a sequence of integer token ids."""
    if _is_array(prompt):
        return prompt.tolist() if prompt.ndim == 1 else None
    try:
        return [_as_id(t) for t in prompt]
    except TypeError:
        return None


def _as_id(value) -> int:
    """int(value) for an int, numpy integer or integer scalar tensor; TypeError for anything else."""
    if isinstance(value, (bool, str)):
        raise TypeError(f"{value!r} is not a token id")
    return operator.index(value)


def _is_id(value) -> bool:
    try:
        _as_id(value)
    except TypeError:
        return False
    return True


def _is_array(value) -> bool:
    """A tensor or numpy array of integers, shaped (T,) or (B, T); any other array is a ConfigError."""
    if not (hasattr(value, "ndim") and hasattr(value, "tolist") and hasattr(value, "dtype")):
        return False
    dtype = str(value.dtype).replace("torch.", "")
    if value.ndim not in (1, 2) or not dtype.startswith(("int", "uint")):
        raise ConfigError(f"an array prompt must hold integer token ids, shaped (T,) or (B, T); got a {dtype} "
                          f"array of shape {tuple(value.shape)}")
    return True


def eos_ids_for(model, tokenizer, config: GenerationConfig) -> list[int]:
    """The ids generation stops on: the ones asked for, else the model's (config.json's eos ids and the
    further ones its generation_config.json lists, as transformers stops on), else the tokenizer's EOS."""
    if config.eos_token_ids is not None:
        return list(config.eos_token_ids)
    ids = model.config.stop_token_ids()
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = [int(tokenizer.eos_token_id)]
    return ids


def plan(model, prompts: Prompts, config: GenerationConfig | SamplingParams | None, tokenizer=None) -> Plan:
    """Validate everything (options, prompt lengths, token budget) before any model work."""
    if config is None:
        config = GenerationConfig()
    elif not isinstance(config, SamplingParams):
        raise ConfigError(f"config must be a GenerationConfig or SamplingParams, got {type(config).__name__}; "
                          "e.g. GenerationConfig(**your_dict)")
    elif not isinstance(config, GenerationConfig):
        config = GenerationConfig(**{f: getattr(config, f) for f in SamplingParams.__dataclass_fields__})
    config.validate(model.config.vocab_size)
    ids, texts = as_token_lists(prompts, tokenizer)
    if not ids:
        raise ConfigError("no prompts given")
    context = model.config.max_position_embeddings
    for i, p in enumerate(ids):
        if not p:
            raise ConfigError(f"prompt {i} is empty; give at least one token (e.g. the BOS token)")
        bad = [t for t in p if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {model.config.vocab_size})")
        if len(p) >= context:
            raise ConfigError(f"prompt {i} has {len(p)} tokens but the model's context is {context} tokens "
                              "(max_position_embeddings): shorten the prompt to leave room for generation")
    room = context - max(len(p) for p in ids)
    if config.max_tokens is not None and config.max_tokens > room:
        raise ConfigError(f"max_new_tokens={config.max_tokens} goes beyond the context: the longest prompt has "
                          f"{context - room} tokens and the context is {context}; use max_new_tokens <= {room}")
    return Plan(ids, texts, config, eos_ids_for(model, tokenizer, config), config.max_tokens or room)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _loop(model, plan: Plan, tokenizer, decoder: Decoder | None, states_out: list | None):
    cfg, n = plan.config, plan.config.n
    decoder = decoder or make_decoder(model)
    device = decoder.device
    rows = [p for p in plan.prompts for _ in range(n)]
    row_params = [cfg if cfg.seed is None else cfg.replace(seed=cfg.seed + j, n=1)
                  for _ in plan.prompts for j in range(n)]  # sample j of a seeded request uses seed + j
    states = [SequenceState(j % n, p, plan.max_new_tokens, plan.eos_token_ids, tokenizer)
              for j, p in enumerate(row_params)]
    if states_out is not None:
        states_out.extend(states)
    tensors = SamplingTensors.from_params(row_params, model.config.vocab_size, device, plan.eos_token_ids,
                                          generators=[make_generator(p.seed, device) for p in row_params])
    counts = TokenCounts.from_prompts(rows, model.config.vocab_size, device) if (
        tensors.do_repetition or tensors.do_presence_frequency or tensors.stop_ids is not None) else None
    want_logprobs = cfg.logprobs is not None
    pad_id = plan.eos_token_ids[0] if plan.eos_token_ids else 0
    ids, mask = left_pad(rows, pad_id, device)
    decoder.start(len(rows), ids.shape[1] + plan.max_new_tokens)
    logits = decoder.prefill(ids, mask if not bool(mask.all()) else None).float()
    active = torch.ones(len(rows), dtype=torch.bool, device=device)
    for step in range(plan.max_new_tokens):
        tokens = sample(process_logits(logits, tensors, counts), tensors)
        if counts is not None:
            counts.update(tokens, active)
        # Copy this step's results to the host asynchronously and launch the next decode step
        # before waiting for them, so the host's bookkeeping overlaps the device's forward.
        results = [tokens]
        if want_logprobs:
            chosen, top_vals, top_ids = logprobs_of(logits, tokens, cfg.logprobs)
            results += [chosen] + ([top_vals, top_ids] if top_ids is not None else [])
        on_host = [t.to("cpu", non_blocking=True) for t in results]
        copied = torch.cuda.Event() if device.type == "cuda" else None
        if copied is not None:
            copied.record()
        next_logits = decoder.decode(tokens) if step + 1 < plan.max_new_tokens else None
        if copied is not None:
            copied.synchronize()
        host_tokens = on_host[0].tolist()
        if want_logprobs:
            chosen = on_host[1].tolist()
            top = ([dict(zip(i, v)) for i, v in zip(on_host[3].tolist(), on_host[2].tolist())]
                   if len(on_host) > 2 else [{}] * len(rows))
        deltas = []
        for r, state in enumerate(states):
            if state.finished:
                continue
            if want_logprobs:
                delta = state.append(host_tokens[r], chosen[r], top[r])
            else:
                delta = state.append(host_tokens[r])
            if delta or state.finished:
                deltas.append((r, delta))
        if deltas:
            yield deltas
        done = [s.finished for s in states]
        if all(done) or next_logits is None:
            break
        if counts is not None:  # finished rows keep decoding padding; their counts must not change
            active = torch.tensor([not d for d in done], device=device)
        logits = next_logits.float()
    for r, state in enumerate(states):  # only reached if max_new_tokens ran out without a finish
        if not state.finished:
            yield [(r, state.finish("length"))]


def generate(model, prompts: Prompts, config: GenerationConfig | SamplingParams | None = None, tokenizer=None,
             *, decoder: Decoder | None = None) -> list[RequestOutput]:
    """Generate for one prompt or a batch; returns one `RequestOutput` per prompt (in order).

    prompts: a string, a list of token ids, a list of either, or a (B, T) tensor. Batched
    prompts are left-padded with an attention mask and give the same tokens as each alone.
    decoder: reuse a `CompiledDecoder` across calls (made automatically on CUDA otherwise).
    """
    p = plan(model, prompts, config, tokenizer)
    if p.config.num_beams > 1:
        from lmstack.infer.beam import beam_search

        results = beam_search(model, p, tokenizer, decoder or make_decoder(model))
    else:
        states: list[SequenceState] = []
        for _ in _loop(model, p, tokenizer, decoder, states):
            pass
        n = p.config.n
        results = [RequestOutput(prompt_token_ids=ids, prompt=text,
                                 outputs=[s.out for s in states[i * n:(i + 1) * n]])
                   for i, (ids, text) in enumerate(zip(p.prompts, p.texts))]
    if p.config.prompt_logprobs is not None:
        for r in results:
            r.prompt_logprobs = prompt_logprobs(model, r.prompt_token_ids)
    return results


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int]) -> list[float | None]:
    """log p(token_t | tokens_<t) for every prompt token (None for the first), from one full forward."""
    x = torch.tensor([ids], device=model.device)
    logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
    return [None] + logp.gather(1, x[0, 1:, None]).squeeze(1).tolist()


def stream(model, prompt: str | Sequence[int], config: GenerationConfig | SamplingParams | None = None,
           tokenizer=None, *, decoder: Decoder | None = None, output: list | None = None) -> Iterator[str]:
    """Yield the text of one prompt's answer as it is generated: complete UTF-8 pieces only.

    Stop strings are never shown (text that might start one is held back until it cannot).
    Pass `output=[]` to receive the finished `CompletionOutput` (tokens, finish_reason) in it.
    """
    if tokenizer is None:
        raise ConfigError("streaming text needs a tokenizer")
    p = plan(model, [prompt] if isinstance(prompt, str) else [list(prompt)], config, tokenizer)
    if p.config.n != 1 or p.config.num_beams != 1:
        raise ConfigError("stream() generates one answer: use n=1 and num_beams=1 (generate() for more)")
    states: list[SequenceState] = []
    for deltas in _loop(model, p, tokenizer, decoder, states):
        for _, text in deltas:
            if text:
                yield text
    if output is not None:
        output.append(states[0].out)
