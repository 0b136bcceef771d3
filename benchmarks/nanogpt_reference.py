"""A faithful minimal re-implementation of nanoGPT's model.py and train.py loop, as a baseline.

nanoGPT is by Andrej Karpathy, https://github.com/karpathy/nanoGPT, MIT License,
Copyright (c) 2022 Andrej Karpathy. The model (GPT with LayerNorm without bias, tied embeddings,
GPT-2 init with scaled residual projections), `configure_optimizers` (AdamW, decay on >= 2-D
tensors), `get_lr` (warmup + cosine), `get_batch` (random windows of a uint16 memmap) and the
training loop (eval every eval_interval on train and val, grad clipping, iter 0..max_iters
inclusive) follow nanoGPT's code; checkpoint saving, DDP and the GPU-only MFU estimate are left
out. Only `benchmarks/bench_train.py` uses it, to measure nanoGPT side by side with lmstack.

The MIT License text: Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions: The above copyright notice
and this permission notice shall be included in all copies or substantial portions of the
Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))


@dataclass
class TrainSettings:
    """train.py's globals for the runs we compare (defaults: config/train_shakespeare_char.py)."""

    device: str = "cpu"
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs in float32 (nullcontext), as nanoGPT
    compile: bool = False
    batch_size: int = 64
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False
    learning_rate: float = 1e-3
    max_iters: int = 5000
    lr_decay_iters: int = 5000
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 200
    seed: int = 1337


def train(train_data: np.ndarray, val_data: np.ndarray, vocab_size: int, s: TrainSettings, log=print) -> dict:
    """nanoGPT's train.py loop on one device; returns the last eval, wall time and iterations/s."""
    torch.manual_seed(s.seed)
    device_type = "cuda" if "cuda" in s.device else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[s.dtype]
    ctx = contextlib.nullcontext() if device_type == "cpu" else torch.amp.autocast(device_type, dtype=ptdtype)
    data = {"train": train_data, "val": val_data}

    def get_batch(split):
        d = data[split]
        ix = torch.randint(len(d) - s.block_size, (s.batch_size,))
        x = torch.stack([torch.from_numpy(d[i:i + s.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + s.block_size].astype(np.int64)) for i in ix])
        if device_type == "cuda":
            return x.pin_memory().to(s.device, non_blocking=True), y.pin_memory().to(s.device, non_blocking=True)
        return x.to(s.device), y.to(s.device)

    config = GPTConfig(block_size=s.block_size, vocab_size=vocab_size, n_layer=s.n_layer, n_head=s.n_head,
                       n_embd=s.n_embd, dropout=s.dropout, bias=s.bias)
    model = GPT(config).to(s.device)
    scaler = torch.amp.GradScaler(device_type, enabled=(s.dtype == "float16" and device_type == "cuda"))
    optimizer = model.configure_optimizers(s.weight_decay, s.learning_rate, (s.beta1, s.beta2), device_type)
    if s.compile:
        model = torch.compile(model)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(s.eval_iters)
            for k in range(s.eval_iters):
                X, Y = get_batch(split)
                with ctx:
                    _, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    def get_lr(it):
        if it < s.warmup_iters:
            return s.learning_rate * (it + 1) / (s.warmup_iters + 1)
        if it > s.lr_decay_iters:
            return s.min_lr
        ratio = (it - s.warmup_iters) / (s.lr_decay_iters - s.warmup_iters)
        return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.learning_rate - s.min_lr)

    X, Y = get_batch("train")
    start = time.perf_counter()
    iter_num, last_eval, train_time, best_val = 0, {}, 0.0, float("inf")
    while True:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % s.eval_interval == 0:
            last_eval = estimate_loss()
            best_val = min(best_val, last_eval["val"])  # nanoGPT keeps the checkpoint of its best val loss
            log(f"nanoGPT step {iter_num}: train loss {last_eval['train']:.4f}, val loss {last_eval['val']:.4f}")
        if iter_num == s.max_iters:
            break  # nanoGPT trains one more step after its last eval; nothing it reports depends on it
        t0 = time.perf_counter()
        with ctx:
            _, loss = model(X, Y)
        X, Y = get_batch("train")
        scaler.scale(loss).backward()
        if s.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda" and iter_num % 10 == 0:
            loss.item()  # nanoGPT syncs at log_interval
        train_time += time.perf_counter() - t0
        iter_num += 1
    if device_type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"val_loss": last_eval["val"], "best_val_loss": best_val, "train_loss": last_eval["train"], "wall_s": wall,
            "train_s": train_time, "model": model, "iters": s.max_iters}
