"""Preference data: prompt / chosen / rejected ids and masks for raw-text and chat records."""

import json

import pytest
import torch
from corpus_helpers import trained_tokenizer

from lmstack.data.preference import PreferenceDataset, load_preference_records, tokenize_preference
from lmstack.data.sft import IGNORE_INDEX
from lmstack.errors import DataError

TEXT = {"prompt": "Q: capital of France?\nA:", "chosen": " Paris.", "rejected": " Lyon."}
CHAT = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": "Lyon, 你好."}
PAIRS = {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}


def test_raw_text_record():
    tok = trained_tokenizer()
    ex = tokenize_preference(tok, TEXT)
    assert ex.prompt_ids == tok.encode(TEXT["prompt"])
    assert ex.chosen_ids == tok.encode(" Paris.") + [tok.eos_token_id]
    assert ex.rejected_ids == tok.encode(" Lyon.") + [tok.eos_token_id]


@pytest.mark.parametrize("record,chosen,rejected", [(CHAT, "Paris.", "Lyon, 你好."), (PAIRS, "4", "5")],
                         ids=["prompt+responses", "two-conversations"])
def test_chat_records_follow_the_template(record, chosen, rejected):
    tok = trained_tokenizer()
    ex = tokenize_preference(tok, record)
    history = record.get("prompt") or record["chosen"][:-1]
    assert ex.prompt_ids == tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
    assert tok.decode(ex.chosen_ids) == chosen + "<|im_end|>\n"
    assert tok.decode(ex.rejected_ids) == rejected + "<|im_end|>\n"
    assert tok.decode(ex.prompt_ids + ex.chosen_ids) == tok.apply_chat_template(
        [*history, {"role": "assistant", "content": chosen}])


def test_dataset_masks_padding_and_resume(tmp_path):
    tok = trained_tokenizer()
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [TEXT, CHAT, PAIRS] * 4))
    ds = PreferenceDataset(path, tok, max_length=64, seed=3)
    batch = ds.next_batch(3)
    for side in ("chosen", "rejected"):
        ids, labels, mask = (batch[f"{side}_{k}"] for k in ("input_ids", "labels", "attention_mask"))
        assert ids.shape == labels.shape == mask.shape
        for b in range(3):
            n = int(mask[b].sum())
            assert (labels[b, n:] == IGNORE_INDEX).all() and (mask[b, :n] == 1).all()
            trained = labels[b][labels[b] != IGNORE_INDEX]
            assert torch.equal(trained, ids[b, n - len(trained):n])  # the response is the tail of the sequence
    state = ds.state_dict()
    expected = [ds.next_batch(5) for _ in range(4)]
    resumed = PreferenceDataset(path, tok, max_length=64, seed=3)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch(5)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_truncation_keeps_prompt_end_and_response_start():
    tok = trained_tokenizer()
    long = {"prompt": "word " * 200 + "END", "chosen": " yes", "rejected": " no"}
    ds = PreferenceDataset([long], tok, max_length=32)
    batch = ds.next_batch(1)
    assert batch["chosen_input_ids"].shape[1] <= 32 and ds.stats.truncated == 1  # pairs, not responses
    text = tok.decode(batch["chosen_input_ids"][0].tolist())
    assert text.endswith("END yes<|eos|>")


def test_bad_preference_records(tmp_path):
    tok = trained_tokenizer()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TEXT) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n"
                    + json.dumps({"chosen": PAIRS["chosen"], "rejected": PAIRS["chosen"][:1]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'rejected'"):
        load_preference_records(path, tok)
    ds = PreferenceDataset(path, tok, 64, skip_bad=True)
    assert ds.stats.skipped_bad == 2 and ds.stats.examples == 1
    assert "bad.jsonl:3: the last message of 'rejected' must be the assistant's response" in ds.stats.bad_examples[1]
