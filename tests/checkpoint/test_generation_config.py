"""generation_config.json travels with the model: its extra stop ids stop generation (as in
transformers), a load/save round trip keeps them, and a malformed file is a CheckpointError naming it.

The file is kept on `ModelConfig.generation_defaults`, never written into config.json."""

import json
from types import SimpleNamespace

import pytest
import torch
from hf_models import hf_model

import lmstack
from lmstack.errors import CheckpointError
from lmstack.infer.chat import stop_ids_for_chat
from lmstack.infer.generate import eos_ids_for, generate
from lmstack.infer.params import GenerationConfig

PROMPT = [3, 14, 15, 92, 65]


@pytest.fixture(scope="module")
def stop_dir(tmp_path_factory):
    """config.json eos 96; generation_config.json eos [96, stop], stop a token greedy decoding reaches."""
    ref = hf_model("llama", seed=2, bos_token_id=1, eos_token_id=96)
    with torch.no_grad():
        free = ref.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=12, eos_token_id=None,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    k = next(i for i in range(3, 12) if free[i] not in free[:i] and free[i] != 96)
    directory = tmp_path_factory.mktemp("stop")
    ref.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [96, free[k]]}))
    return directory, free[k], free


def test_greedy_generation_stops_on_generation_config_eos_like_transformers(stop_dir):
    import transformers

    directory, stop, free = stop_dir
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=12)[0, len(PROMPT):].tolist()
    assert expected[-1] == stop and len(expected) < len(free)  # transformers stopped there
    model, _ = lmstack.load(directory)
    out = generate(model, PROMPT, GenerationConfig(max_new_tokens=12))[0].outputs[0]
    assert out.token_ids == expected and out.finish_reason == "stop"
    assert eos_ids_for(model, None, GenerationConfig()) == [96, stop]  # what the engine stops on too


def test_save_keeps_the_stop_ids_and_config_json_does_not_carry_them(stop_dir, tmp_path):
    import transformers

    directory, stop, _ = stop_dir
    model, _ = lmstack.load(directory)
    assert model.config.generation_defaults == {"bos_token_id": 1, "eos_token_id": [96, stop]}
    model.save_pretrained(tmp_path / "out")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [96, stop]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "generation_defaults" not in config and config["eos_token_id"] == 96
    again, _ = lmstack.load(tmp_path / "out")
    assert again.config.stop_token_ids() == [96, stop]


def test_a_given_config_still_gets_the_directory_stop_ids(stop_dir):
    from lmstack.checkpoint.hf import load_hf_model
    from lmstack.checkpoint.hf_config import read_config

    directory, stop, _ = stop_dir
    config = read_config(directory).replace(pad_vocab_to_multiple=64, generation_defaults=None)
    assert load_hf_model(directory, config=config).config.stop_token_ids() == [96, stop]


def test_chat_stop_ids_come_from_the_loaded_model(stop_dir):
    directory, stop, _ = stop_dir
    model, _ = lmstack.load(directory)
    tokenizer = SimpleNamespace(eos_token_id=2, backend=SimpleNamespace(token_to_id=lambda token: None))
    assert stop_ids_for_chat(tokenizer, model) == sorted({2, 96, stop})
    # a template's end-of-turn tokens stop it too: Llama 3's <|eot_id|>, and 3.1's <|eom_id|> after a tool call
    specials = {"<|eot_id|>": 50, "<|eom_id|>": 51}
    tokenizer.backend = SimpleNamespace(token_to_id=specials.get)
    assert stop_ids_for_chat(tokenizer, model) == sorted({2, 96, stop, 50, 51})


@pytest.mark.parametrize("text,message", [
    ("{not json", r"generation_config\.json is not valid JSON"),
    ("[96, 5]", r"generation_config\.json must hold a JSON object of generation settings, got list"),
    ('{"eos_token_id": "x"}', r"generation_config\.json: eos_token_id must be a token id or a list of them, got 'x'"),
    ('{"eos_token_id": [96, -1]}', r"generation_config\.json: eos_token_id must be a token id"),
    ('{"eos_token_id": [96, 97]}', r"generation_config\.json: eos_token_id=\[96, 97\] is outside the vocabulary "
                                   r"\[0, 97\)"),
])
def test_a_malformed_generation_config_is_named(tmp_path, text, message):
    hf_model("llama").save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as err:
        lmstack.load(tmp_path)
    assert str(tmp_path / "generation_config.json") in str(err.value)


def test_a_quantized_save_keeps_the_stop_ids(stop_dir, tmp_path):
    from lmstack.infer.quantize import quantize, save_quantized

    directory, stop, _ = stop_dir
    model, _ = lmstack.load(directory)
    save_quantized(quantize(model, "int8"), tmp_path / "q8")
    written = json.loads((tmp_path / "q8" / "generation_config.json").read_text())
    assert written["eos_token_id"] == [96, stop]
    reloaded, _ = lmstack.load(tmp_path / "q8")
    assert eos_ids_for(reloaded, None, GenerationConfig()) == [96, stop]
