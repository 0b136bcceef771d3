"""A tiny random Llama with a byte-level BPE tokenizer built here, saved as a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. Hello world! Serving models over HTTP is fun. "
        "Tokens stream back one by one; the client reads them as they come. ") * 20
API_KEY = "test-key-123"  # the key of the shared test server
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


class LiveServer:
    """An app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app, shutdown_timeout: float = 5.0):
        import socket

        from lmstack.serve.server import make_server

        self.app = app
        self.state = app.state.lmstack
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, "127.0.0.1", self.port, shutdown_timeout, log_level="warning")
        self.thread = None

    def __enter__(self) -> LiveServer:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def tiny_engine(model_dir, **options):
    from lmstack.engine import AsyncEngine

    defaults = dict(device="cpu", num_blocks=512, block_size=16, max_num_seqs=64, max_model_len=256)
    defaults.update(options)
    return AsyncEngine(str(model_dir), **defaults)


def wait_idle(engine, timeout: float = 10.0) -> object:
    """Poll the engine until nothing runs or waits and no KV block is held; returns the last stats."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if (s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def reference_logprobs(model, ids):
    """log_softmax of a full forward pass: row i is the distribution of token i + 1."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def reference_greedy(model, ids, max_new_tokens):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def api_error(r, status: int) -> dict:
    """The OpenAI-shaped error body of a response that must have this status."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err
