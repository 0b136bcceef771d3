"""SFT data: loss masks cover exactly the assistant replies in every format; packing leaks nothing."""

import json
import sys
from pathlib import Path

import pytest
import torch
from corpus_helpers import trained_tokenizer

from lmstack.data.sft import IGNORE_INDEX, SFTDataset, load_chat_records, pack_rows, tokenize_chat
from lmstack.errors import DataError
from lmstack.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent.parent / "tokenizer"))
from chat_templates import LLAMA3, MISTRAL, MISTRAL_V3, PHI3, PHI3_TRAINING, QWEN3, QWEN3_TRAINING  # noqa: E402

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
                     {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"},
                     {"role": "assistant", "content": "Eleven, 你好 🎉"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello there."},
                              {"from": "human", "value": "Bye."}, {"from": "gpt", "value": "Goodbye!"}]}


def with_template(template, **tokens):
    base = trained_tokenizer()
    return Tokenizer(base.backend, {**base.config, "chat_template": template, **tokens})


def trained_runs(ids, labels):
    """Decoded runs of consecutive unmasked tokens (one per assistant reply), checking labels == ids there."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("record,replies", [
    (CHAT, ["Seven.", "Eleven, 你好 🎉"]),
    (ALPACA, ["The sum is 5."]),
    (SHAREGPT, ["Hello there.", "Goodbye!"]),
], ids=["chat", "alpaca", "sharegpt"])
@pytest.mark.parametrize("template,end_of_turn", [
    (None, "<|im_end|>\n"), (LLAMA3, "<|eot_id|>"), (MISTRAL, "</s>"),
], ids=["chatml", "llama3", "mistral"])
def test_loss_mask_is_exactly_the_assistant_replies(record, replies, template, end_of_turn):
    if template is MISTRAL and record is CHAT:
        record = {"messages": CHAT["messages"][1:]}  # Mistral's template rejects system messages
    tok = with_template(template, bos_token="<s>", eos_token="</s>") if template else trained_tokenizer()
    [messages] = load_chat_records([record])
    ids, labels = tokenize_chat(tok, messages)
    assert tok.decode(ids) == tok.apply_chat_template(messages)  # the ids are the whole rendered chat
    runs = trained_runs(ids, labels)
    assert [tok.decode(run) for run in runs] == [reply + end_of_turn for reply in replies]
    masked = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert all(reply not in masked for reply in replies)
    assert sum(len(r) for r in runs) == sum(lab != IGNORE_INDEX for lab in labels)


def test_mask_matches_transformers_generation_mask(tmp_path):
    """Reference: transformers' return_assistant_tokens_mask with a {% generation %} ChatML template."""
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
                "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
                "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tok = with_template(template)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for record in (CHAT, ALPACA, SHAREGPT):
        [messages] = load_chat_records([record])
        ids, labels = tokenize_chat(tok, messages)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == out["input_ids"]
        assert [int(lab != IGNORE_INDEX) for lab in labels] == out["assistant_masks"]


PHI3_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<think>", "</think>",
                 "[INST]", "[/INST]"]


def hf_pair(tmp_path, template, **tokens):
    """(lmstack Tokenizer, transformers tokenizer) over one saved directory, chat markers as special tokens."""
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    base = trained_tokenizer()
    backend = Backend.from_str(base.backend.to_str())
    backend.add_special_tokens(PHI3_SPECIALS)
    Tokenizer(backend, {**base.config, "chat_template": template, **tokens}).save(tmp_path)
    return Tokenizer.load(tmp_path), AutoTokenizer.from_pretrained(tmp_path)


REASONING_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "Four.", "reasoning_content": "Add them."},
                  {"role": "user", "content": "And 3+3? 你好"},
                  {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\nSix 🎉"}]


@pytest.mark.parametrize("template,messages", [
    (QWEN3_TRAINING, REASONING_CHAT),
    (QWEN3_TRAINING, CHAT["messages"]),
    (PHI3_TRAINING, CHAT["messages"]),
    (PHI3_TRAINING, CHAT["messages"][:4]),  # ends with a user turn: the closing eos is not trained
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
     "{{ m.content }}<|im_end|>{% endgeneration %}\n{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}",
     CHAT["messages"]),  # the '\n' after <|im_end|> is outside the block: not trained
], ids=["qwen3-training-reasoning", "qwen3-training", "phi3-training", "phi3-training-user-last", "chatml-gen"])
def test_generation_blocks_give_transformers_mask(tmp_path, template, messages):
    """With {% generation %} blocks the mask comes from them (not from render differences), and the ids
    are the whole rendered text encoded at once: both equal transformers' output."""
    tok, hf = hf_pair(tmp_path, template, eos_token="<|endoftext|>")
    ids, labels = tokenize_chat(tok, messages)
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    assert [int(lab != IGNORE_INDEX) for lab in labels] == out["assistant_masks"]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels)) and any(out["assistant_masks"])


REPEATED_REPLY = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there."},
                     {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Hello there."}]


def test_phi3_multi_turn_trains_the_final_eos_on_the_last_reply(tmp_path):
    """Phi-3 appends eos_token only at the end of a conversation. Earlier replies are trained up to their
    <|end|>\\n, the last one also on the eos: the same mask as TRL's phi3_training template (Phi-3 with
    {% generation %} blocks) gets from transformers."""
    tok, _ = hf_pair(tmp_path / "phi3", PHI3, eos_token="<|endoftext|>")
    training, hf_training = hf_pair(tmp_path / "phi3_training", PHI3_TRAINING, eos_token="<|endoftext|>")
    for messages in (CHAT["messages"], CHAT["messages"][1:], CHAT["messages"][:4], REPEATED_REPLY):
        ids, labels = tokenize_chat(tok, messages)
        assert tok.decode(ids) == tok.apply_chat_template(messages)
        out = hf_training.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        assert ids == out["input_ids"]
        assert [int(lab != IGNORE_INDEX) for lab in labels] == out["assistant_masks"]
        assert (ids, labels) == tokenize_chat(training, messages)
    ids, labels = tokenize_chat(tok, CHAT["messages"])
    assert [tok.decode(run) for run in trained_runs(ids, labels)] == [
        "Seven.<|end|>\n", "Eleven, 你好 🎉<|end|>\n<|endoftext|>"]
    ids, labels = tokenize_chat(tok, CHAT["messages"][:4])  # ends with a user turn: its eos is context
    assert [tok.decode(run) for run in trained_runs(ids, labels)] == ["Seven.<|end|>\n"]


@pytest.mark.parametrize("template,messages,cause", [
    (MISTRAL_V3, CHAT["messages"], "system prompt into the last user turn"),
    (QWEN3, CHAT["messages"][1:], r"drops the reasoning \(<think>"),
    (QWEN3, REASONING_CHAT, r"drops the reasoning \(<think>"),
], ids=["mistral-v0.3-system", "qwen3", "qwen3-reasoning"])
def test_rewritten_history_names_the_cause_and_the_way_out(tmp_path, template, messages, cause):
    tok, _ = hf_pair(tmp_path, template, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match=cause) as err:
        tokenize_chat(tok, messages)
    assert "{% generation %}" in str(err.value)
    with pytest.raises(DataError, match=cause):
        SFTDataset([{"messages": messages}], tok, seq_len=256)
    # the ways out the message names work
    single = [m for m in messages if m["role"] != "system"][:2]
    if template is MISTRAL_V3:
        single[0] = {"role": "user", "content": messages[0]["content"] + "\n\n" + single[0]["content"]}
    assert any(lab != IGNORE_INDEX for lab in tokenize_chat(tok, single)[1])
    trl = QWEN3_TRAINING if template is QWEN3 else None
    if trl is not None:
        tok, _ = hf_pair(tmp_path / "training", trl)
        assert len(trained_runs(*tokenize_chat(tok, messages))) == 2


def test_packed_rows_match_examples_run_alone():
    from lmstack.config import get_preset
    from lmstack.model import Transformer

    tok = trained_tokenizer()
    examples = []
    for record in (CHAT, ALPACA, SHAREGPT):
        ids, labels = tokenize_chat(tok, load_chat_records([record])[0])
        examples.append((torch.tensor(ids).numpy(), torch.tensor(labels).numpy()))
    seq_len = sum(len(e[0]) for e in examples) + 5
    [row] = pack_rows(examples, [0, 1, 2], seq_len, pad_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, max_position_embeddings=256))
    model.eval()
    batch = {k: torch.from_numpy(v)[None] for k, v in row.items()}
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], document_ids=batch["document_ids"]).logits
        start = 0
        for ids, _ in examples:
            alone = model(torch.from_numpy(ids)[None]).logits
            torch.testing.assert_close(packed[0, start:start + len(ids)], alone[0], atol=1e-5, rtol=1e-5)
            start += len(ids)
        leaky = model(batch["input_ids"]).logits  # without document masking the later examples change
        assert not torch.allclose(leaky[0, len(examples[0][0]):start], packed[0, len(examples[0][0]):start],
                                  atol=1e-3)
    assert (batch["document_ids"][0, start:] == 0).all() and (batch["labels"][0, start:] == IGNORE_INDEX).all()
    firsts = [0, len(examples[0][0]), len(examples[0][0]) + len(examples[1][0])]
    assert all(batch["positions"][0, f] == 0 and batch["labels"][0, f] == IGNORE_INDEX for f in firsts)


def records_file(tmp_path, n=40):
    path = tmp_path / "sft.jsonl"
    rows = []
    for i in range(n):
        rows.append([CHAT, ALPACA, SHAREGPT][i % 3] | ({"system": f"id {i}"} if i % 3 else {}))
        if i % 3 == 0:
            rows[-1] = {"messages": [{"role": "user", "content": f"question {i}"},
                                     {"role": "assistant", "content": f"answer {i}"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_dataset_batches_ranks_and_resume(tmp_path):
    path = records_file(tmp_path)
    tok = trained_tokenizer()
    ds = SFTDataset(path, tok, seq_len=128, seed=1)
    assert ds.stats.examples == 40 and ds.stats.truncated == 0 and ds.stats.trained_tokens > 0
    batch = ds.next_batch(4)
    assert set(batch) == {"input_ids", "labels", "positions", "document_ids"}
    assert all(v.shape == (4, 128) and v.dtype == torch.int64 for v in batch.values())
    assert (batch["document_ids"].amax(1) >= 2).all()  # rows really are packed
    reference = SFTDataset(path, tok, seq_len=128, seed=1, rank=1, world_size=2)
    expected = [reference.next_batch(3) for _ in range(12)]  # crosses epochs
    first = SFTDataset(path, tok, seq_len=128, seed=1, rank=1, world_size=2)
    for _ in range(5):
        first.next_batch(3)
    resumed = SFTDataset(path, tok, seq_len=128, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for want in expected[5:]:
        got = resumed.next_batch(3)
        assert all(torch.equal(got[k], want[k]) for k in want)
    rank0 = SFTDataset(path, tok, seq_len=128, seed=1, rank=0, world_size=2)
    n_rows = len(rank0._epoch_rows(0)) // 2
    rows0 = {tuple(r.tolist()) for r in rank0.next_batch(n_rows)["input_ids"]}
    rows1 = {tuple(r.tolist()) for r in SFTDataset(path, tok, 128, seed=1, rank=1, world_size=2)
             .next_batch(n_rows)["input_ids"]}
    assert not rows0 & rows1
    unpacked = SFTDataset(path, tok, seq_len=128, pack=False)
    assert (unpacked.next_batch(5)["document_ids"].amax(1) == 1).all()
    assert sum(b["input_ids"].shape[0] for b in unpacked.iter_eval_batches(16)) == 40


def test_truncation_and_bad_records_are_counted(tmp_path):
    tok = trained_tokenizer()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n'
                    + '{"prompt": "x"}\n{oops\n' + json.dumps(ALPACA) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: the conversation has no assistant message"):
        SFTDataset(path, tok, 64)
    ds = SFTDataset(path, tok, 24, skip_bad=True)
    assert ds.stats.skipped_bad == 3 and ds.stats.examples == 2 and ds.stats.truncated >= 1
    assert "bad.jsonl:3: unknown record format (fields: prompt)" in ds.stats.bad_examples[1]
    assert "bad.jsonl:4: malformed JSON" in ds.stats.bad_examples[2]
    with pytest.raises(DataError, match="records:1: chat template refused these messages: .*must alternate"):
        SFTDataset([CHAT], with_template(MISTRAL, bos_token="<s>", eos_token="</s>"), 64)


def test_a_utf8_bom_at_the_start_of_a_chat_file_is_not_part_of_the_first_record(tmp_path):
    """Windows editors save UTF-8 with a byte order mark; json.loads refuses it ("Unexpected UTF-8 BOM")."""
    from lmstack.data.sft import read_json_records

    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    for name, text in (("chats.jsonl", json.dumps(record) + "\n"), ("chats.json", json.dumps([record]))):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert list(read_json_records(path)) == [(1, record)]
