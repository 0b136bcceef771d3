"""config.json fields lmstack does not model survive a load/save round trip as transformers reads them."""

import json

import pytest
from hf_models import hf_model

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
