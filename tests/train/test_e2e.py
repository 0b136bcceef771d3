"""The commands end to end on the real data path: tokenizer -> `data prepare` -> `lmstack pretrain`
(with a resume), and `lmstack finetune --method full` on chat JSONL through SFTDataset."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.cli import main
from lmstack.data import SFTDataset
from lmstack.tokenizer import Tokenizer

TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train([TEXT], 300).save(path)
    return path


def test_pretrain_cli_on_prepared_shards_then_resume(tmp_path, tokenizer_dir, capsys):
    from lmstack.data import PrepareConfig, prepare

    (tmp_path / "corpus.txt").write_text(TEXT)
    prepare(PrepareConfig(inputs=[str(tmp_path / "corpus.txt")], tokenizer=str(tokenizer_dir),
                          out=str(tmp_path / "data"), val_fraction=0.3, text_piece_bytes=2048, progress=False,
                          workers=1))
    out = tmp_path / "run"
    common = ["--data", str(tmp_path / "data"), "--out_dir", str(out), "--seq_len", "32", "--batch_size", "4",
              "--model_overrides", "{num_layers: 1, hidden_size: 32, num_heads: 2, num_kv_heads: 1}",
              "--eval_every", "3", "--eval_batches", "2", "--save_every", "3", "--log_every", "1",
              "--progress", "false", "--warmup_steps", "2", "--schedule", "constant"]
    assert main(["pretrain", *common, "--max_steps", "3"]) == 0
    assert main(["pretrain", *common, "--max_steps", "6", "--resume", "true"]) == 0
    printed = capsys.readouterr()
    assert "resuming from" in printed.err and "val loss" in printed.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    model, tokenizer = lmstack.load(out / "model")
    assert model.config.vocab_size == tokenizer.vocab_size == 305 and model.config.num_layers == 1
    assert (out / "model" / "tokenizer_config.json").is_file()  # the run ships its tokenizer


def test_finetune_full_loss_covers_assistant_tokens_only(tmp_path, tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    assert tokenizer.chat_template  # ChatML, from the default special tokens
    base, _ = lmstack.load("tiny-llama", random_init=True, seed=0, config=lmstack.get_preset("tiny-llama").replace(
        vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    base.save_pretrained(tmp_path / "base", tokenizer=tokenizer)
    chats = [{"messages": [{"role": "system", "content": "You write Python."},
                           {"role": "user", "content": f"Write f{i} with a long explanation of what it does."},
                           {"role": "assistant", "content": f"def f{i}(x): return x"}]} for i in range(12)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))

    out = tmp_path / "ft"
    code = main(["finetune", "--method", "full", "--model", str(tmp_path / "base"), "--data",
                 str(tmp_path / "chats.jsonl"), "--out_dir", str(out), "--seq_len", "192", "--batch_size", "2",
                 "--max_steps", "2", "--log_every", "1", "--progress", "false", "--pad_vocab_to_multiple", "1",
                 "--warmup_steps", "0", "--eval_every", "0", "--save_every", "0"])
    assert code == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    # the same first batch, scored in float64 by hand: mean cross-entropy over assistant tokens only
    batch = SFTDataset(str(tmp_path / "chats.jsonl"), tokenizer, 192, pack=True, seed=0).next_batch(2)
    model = base.double().eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], positions=batch["positions"],
                       document_ids=batch["document_ids"]).logits[:, :-1]

    def mean_ce(targets):
        keep = targets != -100
        return F.cross_entropy(logits[keep], targets[keep]).item()

    assistant_only = mean_ce(batch["labels"][:, 1:])
    every_token = mean_ce(torch.where(batch["document_ids"][:, 1:] > 0, batch["input_ids"][:, 1:], -100))
    assert (batch["labels"] != -100).sum() < (batch["document_ids"] > 0).sum() / 2  # mostly prompt tokens
    assert abs(first["loss"] - assistant_only) <= 1e-5
    assert abs(every_token - assistant_only) > 0.01  # counting the prompt would give another loss
    trained, _ = lmstack.load(out / "model")
    assert any(not torch.equal(p.double(), q) for p, q in zip(trained.parameters(), model.parameters()))
