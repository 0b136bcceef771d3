"""`lmstack generate`, `lmstack chat`, `lmstack quantize`: inference from the terminal.

Thin wrappers over `lmstack.infer`: flags map one to one onto `GenerationConfig` fields
(vLLM's names), so `--config gen.yaml` works with the same keys.
"""

from __future__ import annotations

import sys


def _load(model: str, device: str, dtype: str, need_tokenizer: bool = True):
    import torch

    import lmstack
    from lmstack.checkpoint.hf import resolve_dtype
    from lmstack.errors import ConfigError
    from lmstack.train.distributed import resolve_device

    dev = resolve_device(device)
    resolved = resolve_dtype(dtype)
    if resolved is None and dev.type == "cuda":
        resolved = torch.bfloat16
    from lmstack.infer.quantize import is_quantized_dir

    net, tokenizer = lmstack.load(model, dtype=None if is_quantized_dir(model) else resolved, device=dev)
    if need_tokenizer and tokenizer is None:
        raise ConfigError(f"{model} has no tokenizer.json; text generation needs a tokenizer in the model directory")
    return net.eval(), tokenizer


def _note_default_template(model: str, tokenizer) -> None:
    """Say so when the model has no chat template of its own (a base model): ChatML is a guess."""
    if not tokenizer.chat_template:
        print(f"note: {model} has no chat_template in tokenizer_config.json; using ChatML (<|im_start|> turns), "
              "which a base model was not trained on", file=sys.stderr, flush=True)


def _compile_flag(compile: str) -> bool | None:
    from lmstack.errors import ConfigError

    words = {"auto": None, "yes": True, "true": True, "no": False, "false": False}  # true/false as in pretrain
    if compile not in words:
        raise ConfigError(f"--compile={compile!r} must be auto, yes (true) or no (false)")
    return words[compile]


def generate(
    model: str,
    prompt: str | None = None,
    prompt_file: str | None = None,
    chat: bool = False,
    system: str | None = None,
    max_new_tokens: int | None = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    n: int = 1,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: str = "false",
    stop: list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    include_stop_str_in_output: bool = False,
    logit_bias: dict[int, float] | None = None,
    banned_token_ids: list[int] | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    skip_special_tokens: bool = True,
    seed: int | None = None,
    stream: bool = False,
    json_output: bool = False,
    draft_model: str | None = None,
    num_draft_tokens: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    compile: str = "auto",
) -> None:
    """Generate text from a prompt (greedy by default; sampling, beams, speculative decoding).

    Args:
        model: A Hugging Face model directory with a tokenizer (or one written by `lmstack quantize`).
        prompt: The prompt text.
        prompt_file: Read prompts from this file instead, one per line (a batch).
        chat: Wrap the prompt in the model's chat template as a user message.
        system: System prompt (with --chat).
        max_new_tokens: Tokens to generate at most (None: fill the context).
        temperature: 0 is greedy; higher samples more freely.
        top_p: Nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: Sample among the k most likely tokens; 0 disables it.
        min_p: Drop tokens below min_p times the top probability; 0 disables it.
        repetition_penalty: >1 discourages tokens already in the prompt or output (transformers' rule).
        presence_penalty: Subtracted once from every token already generated (OpenAI's rule).
        frequency_penalty: Subtracted per occurrence of every token already generated.
        n: Samples per prompt (or beams returned with --num_beams).
        num_beams: Beam search width; 1 means no beam search.
        length_penalty: Beam score = sum logprobs / length ** length_penalty.
        early_stopping: Beam search stopping: true, false or never (transformers' semantics).
        stop: Stop strings, e.g. --stop '["\\n\\n"]'; the text is cut before them.
        stop_token_ids: Extra token ids that end generation.
        min_tokens: Generate at least this many tokens before EOS/stop ids may end it.
        ignore_eos: Keep generating past EOS.
        include_stop_str_in_output: Keep the matched stop string at the end of the text.
        logit_bias: Added to token logits, e.g. --logit_bias '{"50256": -100}'.
        banned_token_ids: Token ids never generated, e.g. --banned_token_ids '[0, 1]'.
        logprobs: Also print the logprob of each token and the top-k alternatives.
        prompt_logprobs: Report the logprob of every prompt token (in --json_output).
        skip_special_tokens: Leave special tokens out of the decoded text.
        seed: Seed for reproducible sampling.
        stream: Print text as it is generated.
        json_output: Print the full outputs (tokens, logprobs, finish reasons) as JSON.
        draft_model: A small model with the same tokenizer for speculative decoding.
        num_draft_tokens: Tokens the draft proposes per step.
        device: auto (CUDA if present), cpu or cuda.
        dtype: auto, float32, bfloat16 or float16 (auto: bfloat16 on CUDA, the checkpoint's on CPU).
        compile: auto (CUDA only), yes or no: static KV cache + CUDA graphs + compiled prefill.
    """
    import json

    from lmstack.errors import ConfigError
    from lmstack.infer import GenerationConfig, make_decoder
    from lmstack.infer import generate as run_generate
    from lmstack.infer import stream as run_stream

    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompt_file FILE")
    stopping = {"true": True, "false": False, "never": "never"}.get(str(early_stopping).lower())
    if stopping is None:
        raise ConfigError(f"--early_stopping={early_stopping!r} must be true, false or never")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, n=n, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=stopping, stop=stop, stop_token_ids=stop_token_ids, min_tokens=min_tokens,
        ignore_eos=ignore_eos, include_stop_str_in_output=include_stop_str_in_output, logit_bias=logit_bias,
        banned_token_ids=banned_token_ids, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        skip_special_tokens=skip_special_tokens, seed=seed)
    net, tokenizer = _load(model, device, dtype)
    config.validate(net.config.vocab_size)
    if prompt_file is not None:
        from pathlib import Path

        if not Path(prompt_file).is_file():
            raise ConfigError(f"--prompt_file {prompt_file} does not exist")
        try:
            texts = [line for line in Path(prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise ConfigError(f"--prompt_file {prompt_file} is not UTF-8 text ({err.reason} at byte "
                              f"{err.start}); save it as UTF-8") from None
    else:
        texts = [prompt]
    if chat:
        from lmstack.infer.chat import stop_ids_for_chat

        _note_default_template(model, tokenizer)
        head = [{"role": "system", "content": system}] if system else []
        prompts = [tokenizer.apply_chat_template(head + [{"role": "user", "content": t}], add_generation_prompt=True,
                                                 tokenize=True) for t in texts]
        config.eos_token_ids = stop_ids_for_chat(tokenizer, net)
    else:
        prompts = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
    decoder = make_decoder(net, _compile_flag(compile))
    if draft_model is not None:
        from lmstack.infer.speculative import speculative_generate

        if stream:
            raise ConfigError("--stream is not available with --draft_model: speculative decoding prints each answer "
                              "whole; drop one of them")
        draft, _ = _load(draft_model, device, dtype, need_tokenizer=False)
        results = []
        for ids in prompts:
            out, stats = speculative_generate(net, draft, ids, config, tokenizer, num_draft_tokens, target_decoder=decoder)
            results.append(out)
            print(f"[speculative: acceptance rate {stats.acceptance_rate:.1%}, "
                  f"{stats.tokens_per_pass:.2f} tokens per target pass]", file=sys.stderr)
    elif stream:
        if len(prompts) != 1 or n != 1 or num_beams != 1:
            raise ConfigError("--stream prints one answer: use one --prompt with n=1 and num_beams=1")
        for delta in run_stream(net, prompts[0], config, tokenizer, decoder=decoder):
            print(delta, end="", flush=True)
        print()
        return
    else:
        results = run_generate(net, prompts, config, tokenizer, decoder=decoder)
    for r, text in zip(results, texts):  # the prompts went in as token ids: name them by their text
        r.prompt = text
    if json_output:
        import dataclasses

        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2, ensure_ascii=False))
        return
    for i, r in enumerate(results):
        for out in r.outputs:
            if len(results) > 1 or len(r.outputs) > 1:
                print(f"--- prompt {i}, output {out.index} ({out.finish_reason})")
            print(out.text)
            if out.logprobs is not None:
                for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
                    alts = ", ".join(f"{tokenizer.decode([t])!r}: {v:.3f}" for t, v in top.items())
                    print(f"  {tokenizer.decode([token])!r} {lp:.4f}  [{alts}]")


def chat(
    model: str,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    compile: str = "auto",
) -> None:
    """Chat with a model in the terminal: the answer streams; /reset, /system TEXT, /exit.

    The model's chat template renders the conversation; when it outgrows the context window the
    oldest turns are dropped (the system prompt is kept).

    Args:
        model: A Hugging Face model directory with a tokenizer (and ideally a chat template).
        system: System prompt.
        max_new_tokens: Longest answer, in tokens.
        temperature: 0 is greedy.
        top_p: Nucleus sampling mass in (0, 1].
        top_k: Sample among the k most likely tokens; 0 disables it.
        repetition_penalty: >1 discourages repeating tokens.
        seed: Seed for reproducible answers.
        device: auto (CUDA if present), cpu or cuda.
        dtype: auto, float32, bfloat16 or float16.
        compile: auto (CUDA only), yes or no.
    """
    from lmstack.errors import LmstackError
    from lmstack.infer import GenerationConfig, make_decoder
    from lmstack.infer.chat import ChatSession, stop_ids_for_chat

    net, tokenizer = _load(model, device, dtype)
    _note_default_template(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              repetition_penalty=repetition_penalty, seed=seed)
    session = ChatSession(net, tokenizer, config, system=system, stop_token_ids=stop_ids_for_chat(tokenizer, net),
                          decoder=make_decoder(net, _compile_flag(compile)))
    print(f"lmstack chat: {model} ({net.config.family}, context {session.context} tokens). "
          "Commands: /reset, /system TEXT, /exit", flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("[history cleared]", flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            session.set_system(text[len("/system"):].strip())
            session.reset()
            print(f"[system prompt {'set' if session.system else 'removed'}; history cleared]", flush=True)
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}; commands: /reset, /system TEXT, /exit]", flush=True)
            continue
        dropped = session.dropped_turns
        try:
            for delta in session.send(text):
                print(delta, end="", flush=True)
        except LmstackError as err:
            print(f"[error: {err}]", flush=True)
            continue
        print(flush=True)
        if session.dropped_turns > dropped:
            print("[oldest turns dropped to fit the context window]", flush=True)


def quantize(
    model: str,
    out: str,
    method: str = "int8",
    group_size: int = 128,
    include_lm_head: bool = True,
    device: str = "auto",
    eval_text: str | None = None,
    eval_tokens: int = 4096,
) -> None:
    """Quantize a model's weights with torchao (int8, int4 group-wise, float8) and save it.

    The output directory loads with `lmstack.load` / every lmstack command (not with
    transformers: the tensors are torchao's, in lmstack's fused layout; see docs/inference.md).

    Args:
        model: A Hugging Face model directory.
        out: Output directory.
        method: int8 (per channel), int4 (group-wise) or float8 (CUDA, compute capability >= 8.9).
        group_size: int4 group size: 32, 64, 128 or 256.
        include_lm_head: Quantize the output projection too (tied embeddings get their own copy).
        device: auto, cpu or cuda. int4 saved on CUDA (packed for tinygemm) loads on CUDA only.
        eval_text: A held-out text file: print perplexity before and after quantization.
        eval_tokens: Tokens of eval_text to score.
    """
    from pathlib import Path

    from lmstack.errors import CheckpointError, ConfigError
    from lmstack.infer.quantize import quantize as run_quantize
    from lmstack.infer.quantize import refuse_quantized, save_quantized

    if Path(out).resolve() == Path(model).resolve():
        raise CheckpointError(f"--out {out} is the source directory; write to a new directory")
    if Path(out).is_file():
        raise CheckpointError(f"--out {out} is a file; give a directory to write the quantized model to")
    refuse_quantized(model, "lmstack quantize")  # before loading it
    if eval_text is not None and eval_tokens < 2:
        raise ConfigError(f"--eval_tokens must be at least 2 to score a next token, got {eval_tokens}")
    net, tokenizer = _load(model, device, "auto", need_tokenizer=eval_text is not None)
    before = _perplexity(net, tokenizer, eval_text, eval_tokens) if eval_text else None
    run_quantize(net, method, group_size=group_size, include_lm_head=include_lm_head)
    path = save_quantized(net, out, tokenizer)
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 1e6
    print(f"wrote {path} ({method}, {size:.1f} MB of weights)")
    kept = net.config.extra["quantization_config"]["lmstack"]["kept"]
    if kept:
        print(f"kept in full precision ({len(kept)} layers whose input size is not a multiple of --group_size "
              f"{group_size}): {', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}")
    if before is not None:
        after = _perplexity(net, tokenizer, eval_text, eval_tokens)
        print(f"perplexity on {eval_text}: {before:.3f} -> {after:.3f} ({(after / before - 1) * 100:+.2f}%)")


def _perplexity(model, tokenizer, path: str, max_tokens: int) -> float:
    """exp(mean next-token loss) over the first max_tokens tokens, in context-length windows."""
    import math
    from pathlib import Path

    import torch

    from lmstack.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"--eval_text {path} does not exist")
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8", errors="replace"))[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"--eval_text {path} has fewer than 2 tokens")
    window = min(model.config.max_position_embeddings, 1024)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]], device=model.device)
            if chunk.shape[1] < 2:
                break
            out = model(chunk[:, :-1], labels=chunk[:, 1:], shift_labels=False)
            n = chunk.shape[1] - 1
            total += out.ce_loss.item() * n
            count += n
    return math.exp(total / count)
