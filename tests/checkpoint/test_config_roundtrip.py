"""config.json fields survive a load/save round trip as transformers reads them: the ones lmstack does not
model, and a Mistral's per-layer attention kinds (layer_types)."""

import json

import pytest
import torch
from hf_models import hf_model, token_ids

import lmstack


@pytest.mark.parametrize("family,fields", [
    ("gpt2", {"attn_pdrop": 0.05, "resid_pdrop": 0.1, "embd_pdrop": 0.2}),
    ("llama", {"attention_dropout": 0.3}),
])
def test_dropout_probabilities_round_trip_unless_lmstack_trained_with_its_own(tmp_path, family, fields):
    import transformers

    hf_model(family, **fields).save_pretrained(tmp_path / "src")
    model, _ = lmstack.load(tmp_path / "src")
    model.save_pretrained(tmp_path / "out")
    back = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert {k: getattr(back, k) for k in fields} == fields  # they were all rewritten as 0.0
    model.config.dropout = 0.25  # what a training run with --dropout 0.25 saves
    model.save_pretrained(tmp_path / "trained")
    saved = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert {k: saved[k] for k in fields} == {k: 0.25 for k in fields}


def test_mistral_layer_types_survive_load_then_save(tmp_path):
    """transformers reads a Mistral config.json with layer_types as Ministral, whose layers follow them."""
    import transformers

    ref = hf_model("mistral", sliding_window=6, layer_types=["full_attention", "sliding_attention"])
    ref.save_pretrained(tmp_path / "src")
    model, _ = lmstack.load(tmp_path / "src")
    assert [model.config.window_for_layer(i) for i in range(2)] == [None, 6]
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == ref.config.layer_types
    src, back = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d, attn_implementation="sdpa").eval()
                 for d in ("src", "out"))
    assert type(back).__name__ == "MinistralForCausalLM"
    ids = token_ids((2, 30), seed=4)
    with torch.no_grad():
        ours, before, after = model(ids).logits, src(ids).logits, back(ids).logits
    assert torch.equal(ours, after) and torch.equal(before, after)
