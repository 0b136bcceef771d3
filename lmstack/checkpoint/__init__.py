"""Hugging Face checkpoints in and out (the only weight format lmstack has)."""

from lmstack.checkpoint.hf import load_hf_model, save_hf

__all__ = ["load_hf_model", "save_hf"]
