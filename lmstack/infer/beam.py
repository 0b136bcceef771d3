"""Beam search with transformers' exact semantics (num_beams, length_penalty, early_stopping).

A port of transformers' vectorised `_beam_search`: each step keeps the top 2*num_beams
(more with several EOS ids) continuations over all beams, moves those ending in EOS (or at
max length) into the finished set scored sum_logprobs / length**length_penalty, continues
the best num_beams unfinished ones, and stops by the same early-stopping heuristic. Logits
processors (penalties, min_tokens) act on the log-probabilities, as there.
"""

from __future__ import annotations

import torch

from lmstack.infer.decoder import Decoder
from lmstack.infer.outputs import CompletionOutput, RequestOutput
from lmstack.infer.sampling import SamplingTensors, TokenCounts, apply_penalties

NEG = -1.0e9


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


@torch.inference_mode()
def beam_search(model, plan, tokenizer, decoder: Decoder) -> list[RequestOutput]:
    from lmstack.infer.generate import left_pad

    cfg, K = plan.config, plan.config.num_beams
    B, V, device = len(plan.prompts), model.config.vocab_size, decoder.device
    eos = torch.tensor(plan.eos_token_ids + list(cfg.stop_token_ids or []), dtype=torch.long, device=device)
    if cfg.ignore_eos:
        eos = torch.tensor(list(cfg.stop_token_ids or []), dtype=torch.long, device=device)
    pad_id = plan.eos_token_ids[0] if plan.eos_token_ids else 0
    ids, mask = left_pad(plan.prompts, pad_id, device)
    prompt_len = ids.shape[1]
    max_length = prompt_len + plan.max_new_tokens
    keep = max(2, 1 + eos.numel()) * K
    top_num_beam_mask = torch.cat([torch.ones(K, dtype=torch.bool), torch.zeros(keep - K, dtype=torch.bool)]).to(device)

    flat_prompts = [p for p in plan.prompts for _ in range(K)]
    tensors = SamplingTensors.from_params([cfg] * (B * K), V, device, plan.eos_token_ids)
    counts = TokenCounts.from_prompts(flat_prompts, V, device)
    running = torch.full((B, K, max_length), pad_id, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = ids[:, None]
    sequences = running.clone()
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG
    beam_scores = torch.full((B, K), NEG, device=device)
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    running_idx = torch.full((B, K, max_length - prompt_len), -1, dtype=torch.long, device=device)
    beam_idx = running_idx.clone()

    decoder.start(B * K, max_length)
    logits = decoder.prefill(ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)).float()
    cur = prompt_len
    while True:
        log_probs = apply_penalties(torch.log_softmax(logits, dim=-1), tensors, counts)
        log_probs = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        top_lp, top_i = log_probs.topk(keep, dim=1)
        top_beam, top_ids = top_i // V, top_i % V
        top_running_idx = _gather(running_idx, top_beam)
        top_seqs = _gather(running, top_beam)
        top_seqs[:, :, cur] = top_ids
        top_running_idx[:, :, cur - prompt_len] = top_beam + torch.arange(B, device=device)[:, None] * K
        hits = torch.isin(top_ids, eos) | (cur + 1 >= max_length)

        # the best num_beams unfinished continuations run on
        cont_lp = top_lp + hits.float() * NEG
        nxt = cont_lp.topk(K, dim=1).indices
        running, running_scores, running_idx = _gather(top_seqs, nxt), _gather(cont_lp, nxt), _gather(top_running_idx, nxt)

        # finished candidates (only among the top num_beams) enter the finished set
        just_done = hits & top_num_beam_mask[None, :]
        done_lp = top_lp / ((cur + 1 - prompt_len) ** cfg.length_penalty)
        full = finished.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
        done_lp = done_lp + full.float() * NEG + (~improvable).float() * NEG + (~just_done).float() * NEG
        merged_scores = torch.cat([beam_scores, done_lp], 1)
        best = merged_scores.topk(K, dim=1).indices
        sequences = _gather(torch.cat([sequences, top_seqs], 1), best)
        beam_scores = _gather(merged_scores, best)
        beam_idx = _gather(torch.cat([beam_idx, top_running_idx], 1), best)
        finished = _gather(torch.cat([finished, just_done], 1), best)

        rows = running_idx[:, :, cur - prompt_len].reshape(-1)
        decoder.reorder(rows)
        counts = counts.select(rows)
        counts.update(running[:, :, cur].reshape(-1))
        cur += 1
        if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur - prompt_len
        best_running = running_scores[:, :1] / (best_len ** cfg.length_penalty)
        worst_done = torch.where(finished, beam_scores.min(dim=1, keepdim=True).values, torch.full_like(beam_scores, NEG))
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        open_beam = not (bool(finished.all()) and cfg.early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break
        logits = decoder.decode(running[:, :, cur - 1].reshape(-1)).float()
    return _outputs(plan, sequences, beam_scores, beam_idx, prompt_len, eos, tokenizer)


def _outputs(plan, sequences, beam_scores, beam_idx, prompt_len, eos, tokenizer) -> list[RequestOutput]:
    eos_set = set(eos.tolist())
    results = []
    for b, (prompt, text) in enumerate(zip(plan.prompts, plan.texts)):
        outs = []
        for j in range(plan.config.n):
            length = int((beam_idx[b, j] >= 0).sum())
            tokens = sequences[b, j, prompt_len:prompt_len + length].tolist()
            stopped = bool(tokens) and tokens[-1] in eos_set
            out = CompletionOutput(index=j, token_ids=tokens, finish_reason="stop" if stopped else "length",
                                   cumulative_logprob=float(beam_scores[b, j]))
            if stopped and tokens[-1] in set(plan.config.stop_token_ids or []):
                out.stop_reason = tokens[-1]
            if tokenizer is not None:
                shown = tokens[:-1] if stopped else tokens
                out.text = tokenizer.decode(shown, skip_special_tokens=plan.config.skip_special_tokens)
            outs.append(out)
        results.append(RequestOutput(prompt_token_ids=prompt, prompt=text, outputs=outs))
    return results
