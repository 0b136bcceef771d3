"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one pass.

Greedy: the target keeps the longest prefix of the draft's tokens that equals its own argmax
and adds its own next token, so the output is token for token the target's alone. Sampling:
the standard rejection rule (Leviathan et al. 2023, Chen et al. 2023): accept x ~ q with
probability min(1, p(x) / q(x)), else draw from normalise(max(0, p - q)); every emitted
token is then distributed exactly as the target's (processed) distribution p. One prompt at
a time; penalties are not supported (they would depend on the unverified tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import ConfigError
from lmstack.infer.decoder import Decoder, make_decoder
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.sampling import SamplingTensors, logprobs_of, make_generator, process_logits
from lmstack.infer.stopping import SequenceState


@dataclass
class SpeculativeStats:
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of which the target accepted (the verification rule's count)
    target_passes: int = 0  # target forwards (one per round, plus none for the prompt)
    emitted: int = 0  # tokens in the output (a stop can end a round before its accepted tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens emitted per target forward (1.0 is plain decoding)."""
        return self.emitted / self.target_passes if self.target_passes else 0.0


def accept_tokens(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, greedy: bool,
                  generator: torch.Generator | None = None) -> tuple[int, int]:
    """The verification rule. p: (k+1, V) target probabilities (or logits if greedy), q: (k, V)
    draft probabilities, draft: (k,) proposed tokens. Returns (number accepted n, next token)."""
    k = draft.shape[0]
    if greedy:
        target = p.argmax(dim=-1)
        same = (target[:k] == draft).int()
        n = int(same.cumprod(0).sum())
        return n, int(target[n])
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, draft] / q[rows, draft].clamp_min(1e-20)
    u = torch.rand(k, generator=generator, device=p.device)
    accepted = (u < ratio.clamp(max=1.0)).int().cumprod(0)
    n = int(accepted.sum())
    if n == k:
        dist = p[k]
    else:
        residual = (p[n] - q[n]).clamp_min(0.0)
        total = residual.sum()
        dist = residual / total if float(total) > 0 else p[n]
    return n, int(torch.multinomial(dist, 1, generator=generator))


@torch.inference_mode()
def speculative_generate(target, draft, prompt: list[int], config=None, tokenizer=None, num_draft_tokens: int = 4,
                         target_decoder: Decoder | None = None, draft_decoder: Decoder | None = None,
                         ) -> tuple[RequestOutput, SpeculativeStats]:
    """Generate for one prompt with a draft model; returns the output and acceptance statistics."""
    from lmstack.infer.generate import plan

    if target.config.vocab_size != draft.config.vocab_size:
        raise ConfigError(f"the draft model's vocab_size={draft.config.vocab_size} differs from the target's "
                          f"{target.config.vocab_size}: speculative decoding needs the same tokenizer")
    if num_draft_tokens < 1:
        raise ConfigError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
    p = plan(target, [list(prompt)], config, tokenizer)
    cfg = p.config
    if cfg.n != 1 or cfg.num_beams != 1:
        raise ConfigError("speculative decoding generates one sequence: use n=1 and num_beams=1")
    unsupported = [f"{name}={value!r}" for name, value, off in (
        ("repetition_penalty", cfg.repetition_penalty, 1.0), ("presence_penalty", cfg.presence_penalty, 0.0),
        ("frequency_penalty", cfg.frequency_penalty, 0.0), ("min_tokens", cfg.min_tokens, 0)) if value != off]
    if unsupported:
        raise ConfigError(f"speculative decoding does not support penalties or min_tokens (got "
                          f"{', '.join(unsupported)}); drop them or decode without a draft model")
    if cfg.prompt_logprobs is not None:
        raise ConfigError("speculative decoding does not return prompt_logprobs; lmstack.infer.prompt_logprobs(model, "
                          "ids) scores a prompt")
    if len(p.prompts[0]) + p.max_new_tokens + num_draft_tokens > draft.config.max_position_embeddings:
        raise ConfigError(f"the draft model's context ({draft.config.max_position_embeddings}) is too short for "
                          f"this prompt + max_new_tokens + num_draft_tokens")
    V, device, k = target.config.vocab_size, target.device, num_draft_tokens
    tensors = SamplingTensors.from_params([cfg] * (k + 1), V, device, p.eos_token_ids, generators=[None] * (k + 1))
    gen = make_generator(cfg.seed, device)
    tdec, ddec = target_decoder or make_decoder(target), draft_decoder or make_decoder(draft)
    state = SequenceState(0, cfg, p.max_new_tokens, p.eos_token_ids, tokenizer)
    stats = SpeculativeStats()
    ids = p.prompts[0]
    room = len(ids) + p.max_new_tokens + k + 1
    tdec.start(1, room)
    ddec.start(1, room)
    pending_t = pending_d = list(ids)
    greedy = cfg.greedy

    def probs(logits):  # (T, V) -> processed probabilities (or logits when greedy)
        x = process_logits(logits.float(), tensors.select(list(range(logits.shape[0]))))
        return x if greedy else torch.softmax(x, dim=-1)

    while not state.finished:
        # at most as many proposals as tokens may still follow the round's own: the target never
        # reads past its context, and no accepted token is cut by max_new_tokens
        kr = min(k, p.max_new_tokens - len(state.out.token_ids) - 1)
        proposal, q_rows = [], []
        if kr > 0:  # the draft proposes kr tokens
            d_logits = ddec.extend(torch.tensor([pending_d], device=device))[0, -1:]
            for i in range(kr):
                q = probs(d_logits)[0]
                token = int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=gen))
                proposal.append(token)
                q_rows.append(q)
                if i < kr - 1:
                    d_logits = ddec.decode(torch.tensor([token], device=device))
        # the target scores pending + proposal in one pass (a plain step when nothing is proposed)
        t_logits = tdec.extend(torch.tensor([pending_t + proposal], device=device))[0, -(kr + 1):]
        stats.target_passes += 1
        if kr > 0:
            n, next_token = accept_tokens(probs(t_logits), torch.stack(q_rows),
                                          torch.tensor(proposal, device=device), greedy, gen)
        else:
            x = probs(t_logits)[0]
            n, next_token = 0, int(x.argmax()) if greedy else int(torch.multinomial(x, 1, generator=gen))
        stats.proposed += kr
        stats.accepted += n
        tdec.crop(tdec.length - (kr - n))
        if kr == 0:
            pending_d = pending_d + [next_token]  # the draft has not read pending_d yet
        elif n <= kr - 1:
            ddec.crop(ddec.length - (kr - 1 - n))
            pending_d = [next_token]
        else:
            pending_d = [proposal[-1], next_token]
        pending_t = [next_token]
        emitted = proposal[:n] + [next_token]
        logprobs = None
        if cfg.logprobs is not None:  # the target's own distribution at each emitted position
            chosen, top_vals, top_ids = logprobs_of(t_logits[: n + 1], torch.tensor(emitted, device=device),
                                                    cfg.logprobs)
            logprobs = (chosen.tolist(), [dict(zip(i, v)) for i, v in zip(top_ids.tolist(), top_vals.tolist())]
                        if top_ids is not None else [{}] * len(emitted))
        for j, token in enumerate(emitted):
            if logprobs is not None:
                state.append(token, logprobs[0][j], logprobs[1][j])
            else:
                state.append(token)
            stats.emitted += 1
            if state.finished:
                break
    return RequestOutput(prompt_token_ids=list(ids), outputs=[state.out]), stats
