"""Instruction data: chat / Alpaca / ShareGPT records -> ids + loss mask, packed into rows.

A conversation is rendered through the tokenizer's chat template, and the loss mask is found
one of two ways:

* The template has `{% generation %}` blocks (transformers' assistant-mask markers): the whole
  rendered text is encoded and the tokens covering each block's output are trained, exactly
  transformers' `apply_chat_template(..., tokenize=True, return_dict=True,
  return_assistant_tokens_mask=True)` (`input_ids` and `assistant_masks`).
* Otherwise, by render differences: each assistant reply is the text the template adds between
  "history + generation prompt" and "history + reply", so the mask covers exactly what the model
  must generate (the reply and the template's end-of-turn marker). Pieces are tokenized one by
  one, the way generation sees them: the prompt alone, then the reply. (transformers has no
  mask for such templates: its `assistant_masks` are all 0.)

  Some templates write text only at the very end of a conversation (Phi-3 appends `eos_token`
  when `add_generation_prompt` is false), so "history + reply" is not how that history starts
  once later turns follow. When that trailing text is the only difference (found at a token
  boundary, identical for every turn, and at the end of the whole render), it is left out of
  the earlier replies and attributed to the final assistant reply, which trains it; after a
  final user turn it is context. transformers itself gives no mask here (no markers: all 0);
  this is the mask of TRL's `phi3_training` template (Phi-3 with `{% generation %}` blocks,
  the eos inside one only when the conversation ends with an assistant turn), and what a
  single-turn render trains: the model learns to end the conversation with it.
  Templates that rewrite earlier turns (Mistral moves the system prompt into the last user
  turn, Qwen3 drops `<think>` reasoning from earlier assistant turns) cannot be split this way:
  the error names the likely cause and the ways out (a template with `{% generation %}` blocks,
  merging the system prompt into the first user message, or one assistant reply per example).

Packing concatenates examples into full rows with `document_ids` and restarting `positions`,
so the model's attention never crosses examples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.data.sources import UTF8_BOM, BadRecord
from lmstack.errors import DataError, LmstackError
from lmstack.tokenizer.chat import REASONING_FIELDS

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "tool": "tool", "function_response": "tool", "observation": "tool"}


# ---- reading records -------------------------------------------------------------------
def numbered_records(path_or_records: str | Path | list[Any]) -> tuple[str, Iterable[tuple[int, Any]]]:
    """(name for messages, (line or record number, record) pairs) from a file or an in-memory list."""
    if isinstance(path_or_records, (str, Path)):
        return str(path_or_records), read_json_records(path_or_records)
    return "records", enumerate(path_or_records, start=1)


def read_json_records(path: str | Path) -> Iterable[tuple[int, Any | BadRecord]]:
    """(line, record) from .jsonl, or (index + 1, record) from a .json list; bad lines as BadRecord."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass a .jsonl (or .json list) file of records")
    raw = path.read_bytes()
    raw = raw.removeprefix(UTF8_BOM)  # a byte order mark (Windows editors) is no record text
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path} is not valid UTF-8 JSON ({err}); use a list of records or .jsonl") from None
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a JSON list of records, found {type(data).__name__}")
        yield from enumerate(data, start=1)
        return
    for line, chunk in enumerate(raw.split(b"\n"), start=1):
        if not chunk.strip():
            continue
        try:
            yield line, json.loads(chunk.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield line, BadRecord(str(path), line, f"undecodable bytes {chunk[err.start:err.start + 4]!r} (not UTF-8)")
        except json.JSONDecodeError as err:
            yield line, BadRecord(str(path), line, f"malformed JSON ({err.msg} at column {err.colno})")


def record_messages(record: Any) -> list[dict[str, Any]]:
    """A chat, Alpaca or ShareGPT record as a list of {'role', 'content'} messages (ValueError if not)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError("field 'messages' must be a list of {'role', 'content'} objects")
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ValueError("field 'conversations' must be a list of {'from', 'value'} objects")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise ValueError(f"conversations[{i}] needs 'from' and 'value'")
            if turn["from"] not in SHAREGPT_ROLES:
                raise ValueError(f"conversations[{i}] has unknown speaker {turn['from']!r} "
                                 f"(known: {', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        if isinstance(record.get("system"), str) and record["system"]:
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif "instruction" in record:
        if "output" not in record:
            raise ValueError("Alpaca record has 'instruction' but no 'output'")
        prompt = record["instruction"]
        extra = record.get("input") or ""
        if not isinstance(prompt, str) or not isinstance(extra, str):
            raise ValueError("Alpaca 'instruction' and 'input' must be strings")
        messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
                    {"role": "assistant", "content": record["output"]}]
        if isinstance(record.get("system"), str) and record["system"]:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ValueError(f"unknown record format (fields: {', '.join(sorted(record)) or 'none'}); expected "
                         "'messages' (chat), 'instruction'/'output' (Alpaca) or 'conversations' (ShareGPT)")
    check_messages(messages)
    return messages


def check_messages(messages: list[Any]) -> None:
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} needs a 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise ValueError(f"message {i} ({m['role']}) content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message, so there is nothing to train on")


def load_chat_records(path_or_records: str | Path | list[Any], skip_bad: bool = False,
                      bad: list[BadRecord] | None = None) -> list[list[dict[str, Any]]]:
    """Conversations from a file or a list of records (any of the three formats, mixed freely)."""
    return [messages for _, messages in numbered_chat_records(path_or_records, skip_bad, bad)]


def numbered_chat_records(path_or_records: str | Path | list[Any], skip_bad: bool = False,
                          bad: list[BadRecord] | None = None) -> list[tuple[int, list[dict[str, Any]]]]:
    """(line or record number, messages) pairs; see `load_chat_records`."""
    name, items = numbered_records(path_or_records)
    out = []
    for line, record in items:
        if not isinstance(record, BadRecord):
            try:
                out.append((line, record_messages(record)))
                continue
            except ValueError as err:
                record = BadRecord(name, line, str(err))
        if not skip_bad:
            raise DataError(f"{record} (fix it, or pass --skip-bad to skip and count bad records)")
        if bad is not None:
            bad.append(record)
    if not out:
        raise DataError(f"{name} has no usable conversations")
    return out


# ---- rendering with a loss mask --------------------------------------------------------
def assistant_segments(tokenizer: Any, messages: list[dict[str, Any]], **template_vars: Any) -> list[tuple[str, bool]]:
    """The rendered conversation as [(text, is_assistant_reply)], joined = the full render.

    Found by render differences (see the module docstring), for templates without
    `{% generation %}` blocks; ValueError when the template rewrites earlier turns.
    """
    full = tokenizer.apply_chat_template(messages, **template_vars)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already in segments
    end_suffix: str | None = None  # text the template writes only at the end of a conversation
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant message; a user or system turn must come first")
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, **template_vars)
        with_reply = tokenizer.apply_chat_template(messages[:i + 1], **template_vars)
        reply_end = len(with_reply)
        if with_reply.startswith(prompt) and not full.startswith(with_reply):
            suffix = _conversation_end_suffix(tokenizer, with_reply, full)
            cut = len(with_reply) - len(suffix)
            if (suffix and end_suffix in (None, suffix) and cut >= len(prompt)
                    and _reply_kept(message, with_reply[len(prompt):cut])):
                end_suffix, reply_end = suffix, cut
        if not (with_reply.startswith(prompt) and full.startswith(with_reply[:reply_end]) and len(prompt) >= done):
            raise ValueError(_rewritten_history(i, messages, prompt, with_reply, full, done))
        segments.append((full[done:len(prompt)], False))
        segments.append((with_reply[len(prompt):reply_end], True))
        done = reply_end
    segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _conversation_end_suffix(tokenizer: Any, with_reply: str, full: str) -> str:
    """The text `with_reply` ends with that `full` does not continue with, if `full` ends with it
    too: what the template writes only after the last message (Phi-3: eos_token); else ''.

    The split is moved back to a token boundary of `with_reply`, so a marker is never cut in two
    (Phi-3's "<|endoftext|>" and the "<|user|>" that follows in `full` share their "<|").
    """
    cut = _common_prefix(with_reply, full)
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        starts = [start for start, _ in backend.encode(with_reply, add_special_tokens=False).offsets]
        cut = max((start for start in starts if start <= cut), default=0)
    suffix = with_reply[cut:]
    return suffix if suffix and full.endswith(suffix) else ""


def _reply_kept(message: dict[str, Any], reply_text: str) -> bool:
    """The reply's own text is still in what is left of it (the cut took only template text)."""
    content = message.get("content")
    return bool(reply_text) and (not isinstance(content, str) or content.strip() in reply_text)


def _rewritten_history(i: int, messages: list[dict[str, Any]], prompt: str, with_reply: str, full: str,
                       done: int) -> str:
    """Why assistant turn i cannot be located, the likely cause, and what to do about it."""
    if not with_reply.startswith(prompt):  # history + generation prompt vs history + reply
        shorter, longer, what = prompt, with_reply, "the conversation up to this reply with a generation prompt"
        opening = True
    elif not full.startswith(with_reply):  # history + reply vs the whole conversation
        shorter, longer, what = with_reply, full, "the conversation up to this reply"
        opening = False
    else:  # the prompt of this turn does not reach past the previous reply
        shorter, longer, what = prompt, full[:done], "the prompt of this reply"
        opening = False
    at = _common_prefix(shorter, longer)
    ours, theirs = shorter[at:], longer[at:at + len(shorter) - at]
    system = next((m.get("content") for m in messages if m.get("role") == "system"), None)
    reasoning = [m[k] for m in messages[:i + 1] for k in REASONING_FIELDS
                 if isinstance(m.get(k), str) and m[k].strip()]
    markers = ("use a chat template with {% generation %} blocks around the assistant text (the loss mask then comes "
               "from them, as transformers' return_assistant_tokens_mask)")
    single = "make each example a single exchange (one assistant reply, no earlier assistant turns)"
    if ("<think>" in ours and "<think>" not in theirs) or any(r in ours and r not in theirs for r in reasoning):
        cause = ("the template drops the reasoning (<think>...</think>) of an assistant turn once a later user turn "
                 "follows, as Qwen3's does")
        remedy = f"{markers}, or {single}"
    elif isinstance(system, str) and system.strip() and system in ours and system not in theirs:
        cause = ("the template writes the system prompt into the last user turn, so it moves or vanishes when more "
                 "turns follow, as Mistral's templates do")
        remedy = f"{markers}, or merge the system prompt into the first user message yourself"
    elif opening:
        cause = ("the generation prompt is not how the template starts an assistant turn, or the template renders "
                 "the last user turn differently once a reply follows")
        remedy = markers
    else:
        cause = "the template rewrites earlier turns depending on what follows them"
        remedy = f"{markers}, or {single}"
    return (f"assistant turn {i}: the chat template renders {what} differently once later turns follow ({cause}): "
            f"after {shorter[max(0, at - 30):at]!r} it continues {ours[:40]!r} there but {theirs[:40]!r} in the "
            f"longer conversation, so the assistant text cannot be located; {remedy}")


def _has_generation_markers(tokenizer: Any, template_vars: dict[str, Any]) -> bool:
    check = getattr(tokenizer, "chat_template_has_generation", None)
    return bool(check and check(tools=template_vars.get("tools"), chat_template=template_vars.get("chat_template")))


def tokenize_chat(tokenizer: Any, messages: list[dict[str, Any]], **template_vars: Any) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels equal the ids on assistant replies and -100 elsewhere.

    With `{% generation %}` blocks in the template: the ids encode the whole rendered text and
    the trained tokens are transformers' `assistant_masks`; otherwise the render-difference
    segments, encoded piece by piece (see the module docstring).
    """
    if _has_generation_markers(tokenizer, template_vars):
        ids, mask = tokenizer.assistant_tokens_mask(messages, **template_vars)
        return ids, [token if marked else IGNORE_INDEX for token, marked in zip(ids, mask)]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in assistant_segments(tokenizer, messages, **template_vars):
        piece = tokenizer.encode(text)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return ids, labels


# ---- packing ---------------------------------------------------------------------------
@dataclass
class SFTStats:
    examples: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    without_trained_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)


def pack_rows(examples: list[tuple[np.ndarray, np.ndarray]], order: Iterable[int], seq_len: int, pad_id: int,
              pack: bool = True) -> list[dict[str, np.ndarray]]:
    """Rows of seq_len tokens: input_ids, labels, positions (restart per example), document_ids (1.., 0 = pad)."""
    rows: list[dict[str, np.ndarray]] = []
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    used = 0

    def close() -> None:
        nonlocal parts, used
        row = {"input_ids": np.full(seq_len, pad_id, np.int64), "labels": np.full(seq_len, IGNORE_INDEX, np.int64),
               "positions": np.zeros(seq_len, np.int64), "document_ids": np.zeros(seq_len, np.int64)}
        start = 0
        for doc, (ids, labels) in enumerate(parts, start=1):
            end = start + len(ids)
            row["input_ids"][start:end] = ids
            row["labels"][start:end] = labels
            row["labels"][start] = IGNORE_INDEX  # nothing before an example predicts its first token
            row["positions"][start:end] = np.arange(len(ids))
            row["document_ids"][start:end] = doc
            start = end
        row["positions"][start:] = np.arange(seq_len - start)
        rows.append(row)
        parts, used = [], 0

    for i in order:
        ids, labels = examples[i]
        if parts and (not pack or used + len(ids) > seq_len):
            close()
        parts.append((ids, labels))
        used += len(ids)
    if parts:
        close()
    return rows


class SFTDataset:
    """Chat examples as packed (or padded) rows; rank-disjoint, seeded, resumable like TokenDataset.

    Epoch e shuffles the examples with (seed, e) and packs them in that order; rank r takes rows
    r, r + world_size, ... Examples longer than seq_len are truncated and counted in `stats`.
    """

    def __init__(self, path_or_records: str | Path | list[Any], tokenizer: Any, seq_len: int, pack: bool = True,
                 rank: int = 0, world_size: int = 1, seed: int = 0, skip_bad: bool = False,
                 progress: bool = False, **template_vars: Any):
        from tqdm.auto import tqdm

        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seq_len, self.pack, self.rank, self.world_size, self.seed = seq_len, pack, rank, world_size, seed
        bad: list[BadRecord] = []
        conversations = numbered_chat_records(path_or_records, skip_bad=skip_bad, bad=bad)
        self.stats = SFTStats(skipped_bad=len(bad), bad_examples=[str(b) for b in bad[:20]])
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        source = str(path_or_records) if isinstance(path_or_records, (str, Path)) else "records"
        digest = hashlib.sha256()
        for line, messages in tqdm(conversations, desc="tokenize chats", disable=not progress):
            try:
                ids, labels = tokenize_chat(tokenizer, messages, **template_vars)
            except (ValueError, LmstackError) as err:
                if not skip_bad:
                    raise DataError(f"{source}:{line}: {err} (or pass --skip-bad to skip and count it)") from None
                self.stats.skipped_bad += 1
                if len(self.stats.bad_examples) < 20:
                    self.stats.bad_examples.append(f"{source}:{line}: {err}")
                continue
            if len(ids) > seq_len:
                ids, labels = ids[:seq_len], labels[:seq_len]
                self.stats.truncated += 1
            example = (np.array(ids, np.int64), np.array(labels, np.int64))
            if not (example[1] != IGNORE_INDEX).any():
                self.stats.without_trained_tokens += 1  # truncation cut every reply off: kept, but counted
            self.examples.append(example)
            digest.update(example[0].tobytes() + example[1].tobytes())
        if not self.examples:
            raise DataError(f"{source} has no conversations left to train on")
        self.stats.examples = len(self.examples)
        self.stats.tokens = sum(len(e[0]) for e in self.examples)
        self.stats.trained_tokens = int(sum((e[1] != IGNORE_INDEX).sum() for e in self.examples))
        if not self.stats.trained_tokens:  # a run on it would report loss 0 and change nothing
            raise DataError(f"{source}: none of its {len(self.examples)} conversations keeps an assistant token "
                            f"within seq_len={seq_len} ({self.stats.truncated} were truncated); raise --seq_len, "
                            "or check that the conversations have assistant turns")
        self.fingerprint = digest.hexdigest()
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.epoch, self.step = 0, 0
        self._rows_epoch, self._rows = -1, []
        if len(self._epoch_rows(0)) < world_size:
            raise DataError(f"{source} packs into {len(self._rows)} rows of seq_len={seq_len}: fewer than "
                            f"{world_size} ranks; add data or lower seq_len")

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def _epoch_rows(self, epoch: int) -> list[dict[str, np.ndarray]]:
        if self._rows_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._rows = pack_rows(self.examples, order.tolist(), self.seq_len, self.pad_id, self.pack)
            self._rows_epoch = epoch
        return self._rows

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """input_ids, labels (-100 = no loss; aligned like HF, the model shifts), positions, document_ids."""
        picked = []
        for _ in range(batch_size):
            rows = self._epoch_rows(self.epoch)
            if self.step >= len(rows) // self.world_size:
                self.epoch, self.step = self.epoch + 1, 0
                rows = self._epoch_rows(self.epoch)
            picked.append(rows[self.step * self.world_size + self.rank])
            self.step += 1
        return {k: torch.from_numpy(np.stack([r[k] for r in picked])) for k in picked[0]}

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None):
        """This rank's share of the rows in input order (no shuffle), for validation loss."""
        rows = pack_rows(self.examples, range(len(self.examples)), self.seq_len, self.pad_id, self.pack)
        mine = rows[self.rank::self.world_size]
        for n, first in enumerate(range(0, len(mine), batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            chunk = mine[first:first + batch_size]
            yield {k: torch.from_numpy(np.stack([r[k] for r in chunk])) for k in chunk[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.step * self.world_size, "seed": self.seed,
                "seq_len": self.seq_len, "pack": self.pack, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "pack", "fingerprint"):
            if state.get(key) != self.state_dict()[key]:
                raise DataError(f"SFT data state was saved with a different {key} ({state.get(key)!r} vs "
                                f"{self.state_dict()[key]!r}); resume with the same data and settings")
        self.epoch = int(state["epoch"])
        self.step = int(state["consumed"]) // self.world_size
