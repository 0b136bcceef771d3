"""A tiny random Llama with a byte-level BPE tokenizer built here, saved as a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. Hello world! Serving models over HTTP is fun. "
        "Tokens stream back one by one; the client reads them as they come. ") * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_tokenizer(directory: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHATML, "model_max_length": 256}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok


def build_model_dir(directory: Path, seed: int = 0, max_positions: int = 256) -> Path:
    """tokenizer.json + config.json + model.safetensors of a 2-layer random Llama."""
    import torch
    import transformers as tf

    tok = build_tokenizer(directory)
    config = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=max_positions, tie_word_embeddings=False,
                            eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=None)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so the distribution is not flat
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
