"""The training step: exact gradient accumulation, the SFT loss mask, vocab padding, non-finite losses."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from toy_data import ToyTokenDataset
from train_helpers import ListData, tiny_config, toy_trainer

import lmstack
from lmstack.errors import ConfigError, TrainingError
from lmstack.train import Trainer
from lmstack.train.batches import Batch


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_equals_one_larger_batch(tmp_path):
    big = toy_trainer(tmp_path / "big", batch_size=4, grad_accum=1)
    small = toy_trainer(tmp_path / "small", batch_size=2, grad_accum=2)
    big_losses = [big.train_step() for _ in range(5)]
    small_losses = [small.train_step() for _ in range(5)]
    assert max(abs(a - b) for a, b in zip(big_losses, small_losses)) <= 1e-5
    assert big_losses[-1] < big_losses[0]  # it learns, so later steps compare trained weights
    for (name, p), q in zip(big.raw_model.named_parameters(), small.raw_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def sft_batch(seed: int, prompt_lens: list[int], T: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (len(prompt_lens), T), generator=g)
    labels = ids.clone()
    for row, n in enumerate(prompt_lens):
        labels[row, :n] = -100  # prompt (system + user) tokens carry no loss
    positions = torch.arange(T).expand(len(prompt_lens), T).clone()
    return {"input_ids": ids, "labels": labels, "positions": positions, "document_ids": torch.zeros_like(ids)}


def reference_loss_and_grads(model, batches, masked: bool):
    """Float64 mean cross-entropy over the assistant tokens of all batches together, and its gradient."""
    ref = copy.deepcopy(model).double()
    total, count = 0.0, 0
    for b in batches:
        logits = ref(b["input_ids"], positions=b["positions"]).logits[:, :-1]
        labels = b["labels"][:, 1:] if masked else b["input_ids"][:, 1:]
        keep = labels != -100
        total = total + F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        count += int(keep.sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def test_sft_loss_ignores_prompt_tokens_and_weights_tokens_equally(tmp_path):
    # two micro-batches with very different numbers of assistant tokens: a mean of per-batch means
    # would weight them wrongly; the trainer must match one mean over all assistant tokens
    batches = [sft_batch(1, [9, 10]), sft_batch(2, [2, 3])]
    trainer = Trainer(tiny_config(tmp_path, task="sft", seq_len=12, batch_size=2, grad_accum=2),
                      train_data=ListData(batches))
    model = trainer.raw_model
    ref_loss, ref_grads = reference_loss_and_grads(model, batches, masked=True)
    all_loss, all_grads = reference_loss_and_grads(model, batches, masked=False)
    loss = float(trainer.accumulate_gradients([Batch.of(b) for b in batches]))
    got = grads(model)
    assert abs(loss - ref_loss) <= 1e-5
    for name, g in got.items():
        assert torch.allclose(g.double(), ref_grads[name], atol=1e-6, rtol=1e-4), name
    # the prompt tokens would change the result: counting them gives another loss and gradient
    diff = max((got[n].double() - all_grads[n]).abs().max().item() for n in got)
    assert diff > 1e-3 and abs(all_loss - ref_loss) > 1e-4


def test_vocab_padding_does_not_change_training(tmp_path):
    base, _ = lmstack.load("tiny-llama", random_init=True, seed=0,
                           config=lmstack.get_preset("tiny-llama").replace(vocab_size=250))
    base.save_pretrained(tmp_path / "start")
    losses, exported = {}, {}
    for pad in (1, 64):
        out = tmp_path / f"pad{pad}"
        trainer = Trainer(tiny_config(out, model=str(tmp_path / "start"), pad_vocab_to_multiple=pad, max_steps=3),
                          train_data=ToyTokenDataset(16, vocab_size=250))
        assert trainer.raw_model.embed.weight.shape[0] == (256 if pad == 64 else 250)
        losses[pad] = [trainer.train_step() for _ in range(3)]
        exported[pad], _ = lmstack.load(trainer.export_model(out / "model"))
    assert max(abs(a - b) for a, b in zip(losses[1], losses[64])) <= 1e-6
    for (name, p), q in zip(exported[1].named_parameters(), exported[64].parameters()):
        # Adam divides by sqrt(v): matmul rounding that differs with the row count shows up ~1e-6
        assert p.shape == q.shape and torch.allclose(p, q, atol=1e-5), name


def test_nonfinite_loss_skips_the_step_then_stops(tmp_path, capsys):
    trainer = toy_trainer(tmp_path, max_steps=20, max_nonfinite_steps=3, save_every=2)
    poison = {"on": False}
    trainer.raw_model.embed.register_forward_hook(lambda m, i, o: o * float("nan") if poison["on"] else o)
    for _ in range(2):
        trainer.train_step()
    trainer.save_checkpoint()
    before = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
    poison["on"] = True
    for _ in range(2):
        assert math.isnan(trainer.train_step())
    assert all(torch.equal(before[n], p) for n, p in trainer.raw_model.named_parameters())
    assert trainer.nonfinite_in_a_row == 2
    poison["on"] = False
    assert torch.isfinite(torch.tensor(trainer.train_step()))
    assert trainer.nonfinite_in_a_row == 0  # a good step resets the count
    poison["on"] = True
    with pytest.raises(TrainingError, match=r"3 non-finite steps in a row.*step-00000002"):
        trainer.fit()
    assert "skipped the update" in capsys.readouterr().err
    reloaded, _ = lmstack.load(tmp_path / "checkpoints" / "step-00000002")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def optimizer_snapshot(trainer) -> list[torch.Tensor]:
    return [t.clone() for state in trainer.optimizer.state.values() for t in state.values()]


@pytest.mark.parametrize("on_device", [True, False], ids=["fused-found_inf", "host-check"])
def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(tmp_path, on_device):
    # on the device (fused AdamW's found_inf: no host sync) or on the host after reading the loss
    trainer = toy_trainer(tmp_path, max_nonfinite_steps=5)
    assert trainer.skip_on_device  # a fused AdamW on CPU, no fp16 scaler, no FSDP
    trainer.skip_on_device = on_device
    poison = {"on": False}
    trainer.raw_model.embed.register_forward_hook(lambda m, i, o: o * float("inf") if poison["on"] else o)
    trainer.train_step()
    weights = [p.detach().clone() for p in trainer.raw_model.parameters()]
    moments = optimizer_snapshot(trainer)
    poison["on"] = True
    trainer.launch_step()
    trainer.launch_step()
    assert math.isnan(trainer.settle()) and not trainer._pending
    assert trainer.nonfinite_in_a_row == 2 and trainer.step == 3
    assert all(torch.equal(a, p) for a, p in zip(weights, trainer.raw_model.parameters()))
    # AdamW's moments and its step count (which sets the bias correction) did not move either
    assert all(torch.equal(a, b) for a, b in zip(moments, optimizer_snapshot(trainer)))
    assert all(p.grad is None for p in trainer.raw_model.parameters())


def test_skipping_on_the_device_does_not_change_good_steps(tmp_path):
    # found_inf = 0 must give bitwise the update torch's fused AdamW gives without it
    runs = {}
    for on_device in (True, False):
        trainer = toy_trainer(tmp_path / str(on_device))
        trainer.skip_on_device = on_device
        runs[on_device] = ([trainer.train_step() for _ in range(4)],
                           [p.detach().clone() for p in trainer.raw_model.parameters()])
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))


def test_fit_reads_each_loss_one_step_late_except_at_log_steps(tmp_path, monkeypatch):
    import lmstack.train.trainer as trainer_module

    trainer = toy_trainer(tmp_path, max_steps=5, log_every=2)
    lag = {}  # step of a loss -> how many steps had been launched after it when it was read

    class Recording(trainer_module.PendingLoss):
        def value(self):
            lag[self.step] = trainer.step - self.step
            return super().value()

    monkeypatch.setattr(trainer_module, "PendingLoss", Recording)
    trainer.fit()
    # steps 1 and 3 are read while the next step is already queued; log steps 2, 4, 5 at once
    assert lag == {1: 1, 2: 0, 3: 1, 4: 0, 5: 0}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert not trainer._pending  # nothing left unread at the end


def test_chunked_loss_trains_like_the_full_loss(tmp_path):
    plain = toy_trainer(tmp_path / "plain")
    a = [plain.train_step() for _ in range(4)]
    chunked = toy_trainer(tmp_path / "chunked", loss_chunk_tokens=24)  # 4 x 16 tokens: 3 chunks
    assert chunked.raw_model.loss_chunk_tokens == 24
    b = [chunked.train_step() for _ in range(4)]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    assert chunked.evaluate()["val_loss"] == pytest.approx(plain.evaluate()["val_loss"], abs=1e-4)
    with pytest.raises(ConfigError, match="loss_chunk_tokens needs the whole LM head weight, which FSDP shards"):
        tiny_config(tmp_path / "fsdp", loss_chunk_tokens=8, distributed="fsdp")


def test_activation_checkpointing_gives_the_same_steps(tmp_path):
    # (a Trainer seeds the process's RNG when built, so each is built right before it runs)
    plain = toy_trainer(tmp_path / "plain", dropout=0.1)
    a = [plain.train_step() for _ in range(3)]
    recompute = toy_trainer(tmp_path / "ckpt", dropout=0.1, activation_checkpointing=True)
    assert recompute.raw_model.gradient_checkpointing
    b = [recompute.train_step() for _ in range(3)]  # recomputation replays the dropout masks
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
