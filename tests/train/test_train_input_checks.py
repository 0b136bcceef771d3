"""Inputs that used to be caught late or not at all: each is refused before the first step."""

from __future__ import annotations

import json

import pytest

import lmstack
from lmstack.cli import main
from lmstack.data import PrepareConfig, SFTDataset, prepare
from lmstack.errors import ConfigError, DataError
from lmstack.tokenizer import Tokenizer

TEXT_A = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
TEXT_B = "\n".join(f"The {i}th river runs {i % 5} miles to the sea." for i in range(300))


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Two BPE tokenizers of the same size trained on different text, and data prepared with each."""
    root = tmp_path_factory.mktemp("toks")
    out = {}
    for name, text in (("a", TEXT_A), ("b", TEXT_B)):
        Tokenizer.train([text], 280).save(root / f"tok-{name}")
        (root / f"{name}.txt").write_text(text)
        prepare(PrepareConfig(inputs=[str(root / f"{name}.txt")], tokenizer=str(root / f"tok-{name}"),
                              out=str(root / f"data-{name}"), val_fraction=0.2, text_piece_bytes=2048,
                              progress=False, workers=1))
        out[name] = (root / f"tok-{name}", root / f"data-{name}")
    return out


def run(tmp_path, *extra, max_steps: int = 2):
    return main(["pretrain", "--out_dir", str(tmp_path / "run"), "--seq_len", "16", "--batch_size", "2",
                 "--max_steps", str(max_steps), "--progress", "false",
                 "--model_overrides", "{num_layers: 1, hidden_size: 32, num_heads: 2, num_kv_heads: 1}", *extra])


def test_data_and_tokenizer_from_different_tokenizers_are_refused(tmp_path, two_tokenizers, capsys):
    (tok_a, data_a), (tok_b, data_b) = two_tokenizers["a"], two_tokenizers["b"]
    assert Tokenizer.load(tok_a).vocab_size == Tokenizer.load(tok_b).vocab_size  # sizes alone cannot tell
    assert run(tmp_path, "--data", str(data_a), "--tokenizer", str(tok_b)) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer {tok_b} and --data {data_a} (prepared with it) are different tokenizers" in err
    assert "lmstack data prepare --tokenizer MODEL_DIR" in err
    assert run(tmp_path, "--data", str(data_a), "--val_data", str(data_b)) == 2
    assert "--val_data" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step
    assert run(tmp_path, "--data", str(data_a), "--tokenizer", str(tok_a)) == 0  # the matching pair trains


def test_continued_pretraining_on_data_of_another_tokenizer_is_refused(tmp_path, two_tokenizers, capsys):
    (_, data_a), (_, data_b) = two_tokenizers["a"], two_tokenizers["b"]
    assert run(tmp_path, "--data", str(data_a)) == 0
    model_dir = tmp_path / "run" / "model"  # ships tokenizer A
    code = main(["pretrain", "--model", str(model_dir), "--data", str(data_b), "--out_dir", str(tmp_path / "more"),
                 "--seq_len", "16", "--batch_size", "2", "--max_steps", "1", "--progress", "false"])
    assert code == 2
    assert f"the model's tokenizer ({model_dir}) and --data {data_b}" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, two_tokenizers):
    from lmstack.train import TrainConfig, Trainer

    small, _ = lmstack.load("tiny-llama", random_init=True, seed=0)
    small.save_pretrained(tmp_path / "small")  # vocab 256, no tokenizer of its own
    tok_a, data_a = two_tokenizers["a"]
    config = TrainConfig(model=str(tmp_path / "small"), data=str(data_a), out_dir=str(tmp_path / "o"), seq_len=16,
                         batch_size=2, max_steps=1, progress=False, tensorboard=False)
    with pytest.raises(DataError, match=r"the tokenizer has 285 tokens but model .*small has vocab_size=256"):
        Trainer(config)


def test_an_empty_sample_prompt_is_refused_up_front(tmp_path):
    from lmstack.train import TrainConfig

    with pytest.raises(ConfigError, match="sample_prompt must be some text .* got ''"):
        TrainConfig(out_dir=str(tmp_path), sample_prompt="")


def test_sft_data_with_no_assistant_token_within_seq_len_is_refused(tmp_path, two_tokenizers):
    tokenizer = Tokenizer.load(two_tokenizers["a"][0])
    chats = [{"messages": [{"role": "user", "content": "Write a function with a long, long explanation " * 4},
                           {"role": "assistant", "content": "def f(x): return x"}]}] * 3
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    with pytest.raises(DataError, match=r"chats.jsonl: none of its 3 conversations keeps an assistant token within "
                                        r"seq_len=16 \(3 were truncated\); raise --seq_len"):
        SFTDataset(str(tmp_path / "chats.jsonl"), tokenizer, 16)


def test_a_file_where_a_directory_is_expected_and_the_reverse(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT_A)
    assert run(tmp_path, "--data", str(tmp_path / "corpus.txt")) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'corpus.txt'} is a file; pretraining reads a directory of token shards" in err
    assert "lmstack data prepare --input" in err
    code = main(["finetune", "--model", "tiny-llama", "--data", str(tmp_path), "--out_dir", str(tmp_path / "o")])
    assert code == 2
    assert f"--data {tmp_path} is a directory; fine-tuning reads a .jsonl" in capsys.readouterr().err


def test_resuming_past_max_steps_is_refused(tmp_path, two_tokenizers, capsys):
    data_a = two_tokenizers["a"][1]
    assert run(tmp_path, "--data", str(data_a), "--save_every", "2") == 0  # checkpoint at step 2
    assert run(tmp_path, "--data", str(data_a), "--resume", "true", max_steps=1) == 2
    assert "is at step 2, beyond --max_steps 1; raise --max_steps above 2" in capsys.readouterr().err
    assert run(tmp_path, "--data", str(data_a), "--resume", "true", max_steps=3) == 0


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    from lmstack.train import TrainConfig

    (tmp_path / "run.yaml").write_text("lr: 3e-4\nmin_lr: 1e-5\nweight_decay: 0\n")  # YAML reads 3e-4 as text
    config = TrainConfig.from_yaml(tmp_path / "run.yaml")
    assert (config.lr, config.min_lr, config.weight_decay) == (3e-4, 1e-5, 0.0)
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr must be a number, got 'fast'"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")


def test_an_out_dir_that_cannot_hold_the_run_is_refused_before_any_work(tmp_path, two_tokenizers, capsys):
    import os

    data_a = two_tokenizers["a"][1]
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "afile", "is a file; give a directory"),
                         (tmp_path / "afile" / "run", "which is a file; give a directory")):
        code = main(["pretrain", "--data", str(data_a), "--out_dir", str(out), "--max_steps", "1", "--progress", "false"])
        assert code == 2 and message in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").parent.mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    assert run(tmp_path, "--data", str(data_a)) == 2
    assert "checkpoints is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code = main(["pretrain", "--data", str(data_a), "--out_dir", str(locked / "run"), "--max_steps", "1"])
        assert code == 2 and "cannot be written" in capsys.readouterr().err


def test_options_of_the_wrong_type_are_named(tmp_path):
    from lmstack.train import TrainConfig

    for change, message in ((dict(resume="false"), "resume must be true or false, got 'false'"),
                            (dict(seed="1"), "seed must be an integer, got '1'"),
                            (dict(decay_steps=2.5), "decay_steps must be an integer, got 2.5"),
                            (dict(lr=float("nan")), "lr must be a finite number, got nan"),
                            (dict(model=["tiny-llama"]), r"model must be a string, got \['tiny-llama'\]")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(out_dir=str(tmp_path), **change)
    assert TrainConfig(out_dir=tmp_path).out_dir == str(tmp_path)  # a Path is fine


def test_finetune_skip_bad_skips_and_counts_malformed_conversations(tmp_path, two_tokenizers, capsys):
    assert run(tmp_path, "--data", str(two_tokenizers["a"][1])) == 0
    good = {"messages": [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "return x"}]}
    bad = {"messages": [{"role": "user", "content": 5}]}
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good, good)))
    args = ["finetune", "--model", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "chats.jsonl"),
            "--out_dir", str(tmp_path / "ft"), "--seq_len", "32", "--batch_size", "2", "--max_steps", "1",
            "--progress", "false"]
    assert main(args) == 2
    assert "chats.jsonl:2" in capsys.readouterr().err
    assert main([*args, "--skip_bad", "true"]) == 0
    assert "skipped 1 malformed conversations (--skip_bad)" in capsys.readouterr().err


@pytest.mark.parametrize("minutes", [0, -1, float("inf")])
def test_quickstart_refuses_a_time_budget_that_is_not_positive(tmp_path, minutes):
    from lmstack.train.quickstart import run_quickstart

    with pytest.raises(ConfigError, match=f"--minutes {minutes} must be a positive number of minutes"):
        run_quickstart(out_dir=str(tmp_path / "qs"), device="cpu", minutes=minutes)
    assert not (tmp_path / "qs").exists()


def test_a_checkpoints_train_config_yaml_reruns_the_same_run(tmp_path, two_tokenizers, capsys):
    from safetensors.torch import load_file
    from train_helpers import losses

    assert run(tmp_path, "--data", str(two_tokenizers["a"][1]), "--log_every", "1", "--dropout", "0.1") == 0
    saved = tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state" / "train_config.yaml"
    assert "task: pretrain" in saved.read_text()
    assert main(["pretrain", "--config", str(saved), "--out_dir", str(tmp_path / "again")]) == 0
    assert losses(tmp_path / "again") == losses(tmp_path / "run")  # the file describes the whole run
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("run", "again"))
    assert all(a[k].equal(b[k]) for k in a)
    capsys.readouterr()
    assert main(["finetune", "--config", str(saved), "--out_dir", str(tmp_path / "ft")]) == 2
    assert ("task='pretrain' but `lmstack finetune` trains task 'sft'; run this config with `lmstack pretrain`"
            in capsys.readouterr().err)
    assert not (tmp_path / "ft").exists()
