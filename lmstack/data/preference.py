"""Preference data for reward models and DPO: {"prompt", "chosen", "rejected"} -> token ids + masks.

Strings are raw text (the response gets EOS appended); message lists are chats rendered
through the tokenizer's template, with the response being exactly what the template adds for
the final assistant turn (as in sft.py). Records that hold two whole conversations under
"chosen"/"rejected" (no "prompt") share everything before their last assistant turn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.data.sft import IGNORE_INDEX, check_messages, numbered_records
from lmstack.data.sources import BadRecord
from lmstack.errors import DataError, LmstackError


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the chosen response only
    rejected_ids: list[int]


def _split_conversation(messages: Any, name: str) -> tuple[list[dict], dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field {name!r} must be a string or a non-empty list of messages")
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise ValueError(f"the last message of {name!r} must be the assistant's response")
    _check_named(messages, name)
    return messages[:-1], messages[-1]


def _response(value: Any, name: str) -> dict | str:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise ValueError(f"field {name!r} is a message with role {value.get('role')!r}; a response must be "
                             "the assistant's ('role': 'assistant')")
        _check_named([value], name)
        return value
    _, reply = _split_conversation(value, name)
    return reply


def _check_named(messages: list[Any], name: str) -> None:
    """SFT's message checks (role, string content) with errors that name the field."""
    try:
        check_messages(messages)
    except ValueError as err:
        if str(err).startswith("the conversation has no assistant message"):
            return  # a prompt has none; the response is checked on its own
        raise ValueError(f"field {name!r}: {err}") from None


def tokenize_preference(tokenizer: Any, record: Any) -> PreferenceExample:
    """One record (raw-text or chat form) as prompt / chosen / rejected ids (ValueError if malformed)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"missing field {key!r} (fields: {', '.join(sorted(record))})")
    prompt = record.get("prompt")
    if isinstance(prompt, str) and isinstance(record["chosen"], str) and isinstance(record["rejected"], str):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return PreferenceExample(tokenizer.encode(prompt), tokenizer.encode(record["chosen"]) + eos,
                                 tokenizer.encode(record["rejected"]) + eos)
    if prompt is None:
        history, chosen = _split_conversation(record["chosen"], "chosen")
        other, rejected = _split_conversation(record["rejected"], "rejected")
        if other != history:
            raise ValueError("'chosen' and 'rejected' conversations differ before their last assistant turn")
    else:
        history = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(history, list) or not history:
            raise ValueError("field 'prompt' must be a string or a non-empty list of messages")
        _check_named(history, "prompt")
        chosen, rejected = _response(record["chosen"], "chosen"), _response(record["rejected"], "rejected")
    prompt_text = tokenizer.apply_chat_template(history, add_generation_prompt=True)
    replies = []
    for reply in (chosen, rejected):
        full = tokenizer.apply_chat_template([*history, reply])
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        replies.append(tokenizer.encode(full[len(prompt_text):]))
    return PreferenceExample(tokenizer.encode(prompt_text), replies[0], replies[1])


@dataclass
class PreferenceStats:
    examples: int = 0
    skipped_bad: int = 0
    truncated: int = 0  # pairs with either response (or the prompt) cut to max_length
    bad_examples: list[str] = field(default_factory=list)


def load_preference_records(path_or_records: str | Path | list[Any], tokenizer: Any, skip_bad: bool = False,
                            stats: PreferenceStats | None = None) -> list[PreferenceExample]:
    """Every record tokenized; a bad one raises DataError naming file and line, or is counted."""
    stats = stats if stats is not None else PreferenceStats()
    name, items = numbered_records(path_or_records)
    out = []
    for line, record in items:
        if not isinstance(record, BadRecord):
            try:
                out.append(tokenize_preference(tokenizer, record))
                continue
            except (ValueError, LmstackError) as err:
                record = BadRecord(name, line, str(err))
        if not skip_bad:
            raise DataError(f"{record} (fix it, or pass --skip-bad to skip and count bad records)")
        stats.skipped_bad += 1
        if len(stats.bad_examples) < 20:
            stats.bad_examples.append(str(record))
    if not out:
        raise DataError(f"{name} has no usable preference records")
    stats.examples = len(out)
    return out


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Keep the response's start and the prompt's end within max_length."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    response = response[:max(max_length // 2, max_length - len(prompt))]
    keep = max_length - len(response)
    return (prompt[len(prompt) - keep:] if keep else []), response, True


class PreferenceDataset:
    """Batches of (chosen, rejected) pairs, right-padded: `{chosen,rejected}_{input_ids,labels,attention_mask}`.

    labels are -100 on the prompt and padding (HF-aligned; the model shifts), so the summed
    log-probability over labels is DPO's log pi(response | prompt); a reward model reads the
    last real token (attention_mask.sum(1) - 1). Order, ranks and resume work as in SFTDataset.
    """

    def __init__(self, path_or_records: str | Path | list[Any], tokenizer: Any, max_length: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, skip_bad: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.max_length, self.rank, self.world_size, self.seed = max_length, rank, world_size, seed
        self.stats = PreferenceStats()
        self.examples = load_preference_records(path_or_records, tokenizer, skip_bad, self.stats)
        if len(self.examples) < world_size:
            raise DataError(f"{len(self.examples)} preference pairs are fewer than {world_size} ranks")
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.rows = []
        digest = hashlib.sha256()
        for ex in self.examples:
            pair = []
            truncated = False
            for response in (ex.chosen_ids, ex.rejected_ids):
                prompt, reply, cut = _fit(ex.prompt_ids, response, max_length)
                truncated = truncated or cut
                pair.append((prompt + reply, [IGNORE_INDEX] * len(prompt) + reply))
                digest.update(np.array(pair[-1][0], np.int64).tobytes())
            self.stats.truncated += truncated  # pairs, as examples counts pairs
            self.rows.append(pair)
        self.fingerprint = digest.hexdigest()
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order_cache = -1, np.zeros(0, np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order_cache = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._order_epoch = epoch
        return self._order_cache

    def _collate(self, pairs: list) -> dict[str, torch.Tensor]:
        out = {}
        for side, name in enumerate(("chosen", "rejected")):
            width = max(len(p[side][0]) for p in pairs)
            ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.int64)
            labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.int64)
            mask = torch.zeros((len(pairs), width), dtype=torch.int64)
            for b, pair in enumerate(pairs):
                seq, lab = pair[side]
                ids[b, :len(seq)] = torch.tensor(seq)
                labels[b, :len(seq)] = torch.tensor(lab)
                mask[b, :len(seq)] = 1
            out |= {f"{name}_input_ids": ids, f"{name}_labels": labels, f"{name}_attention_mask": mask}
        return out

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        pairs = []
        for _ in range(batch_size):
            if self.step >= len(self.rows) // self.world_size:
                self.epoch, self.step = self.epoch + 1, 0
            pairs.append(self.rows[int(self._order(self.epoch)[self.step * self.world_size + self.rank])])
            self.step += 1
        return self._collate(pairs)

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None):
        mine = self.rows[self.rank::self.world_size]
        for n, first in enumerate(range(0, len(mine), batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            yield self._collate(mine[first:first + batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.step * self.world_size, "seed": self.seed,
                "max_length": self.max_length, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "max_length", "fingerprint"):
            if state.get(key) != self.state_dict()[key]:
                raise DataError(f"preference data state was saved with a different {key}; resume with the "
                                "same data and settings")
        self.epoch, self.step = int(state["epoch"]), int(state["consumed"]) // self.world_size
