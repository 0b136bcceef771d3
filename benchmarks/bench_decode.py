"""Single-request decode speed: lmstack (bf16 / int8 / int4) against transformers' generate().

Batch 1, greedy, EOS ignored so every run generates exactly --new-tokens tokens. On CUDA the
lmstack path is the compiled one (static KV cache, CUDA-graph decode step, bucketed prefill);
the device's copy bandwidth is measured here, so each row also shows the fraction of the
weight-read limit (bandwidth / bytes of weights read per token) it reaches. Quantized rows
also report perplexity, KL divergence and top-1 agreement against the unquantized model on
held-out text (random weights: the perplexity itself means nothing, its change does).

    python benchmarks/bench_decode.py --device cuda            # Llama-3.2-1B shapes, bf16, int8, int4
    python benchmarks/bench_decode.py --device cpu             # GPT-2 124M, fp32, eager
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table, median, report, synchronize

import lmstack
from lmstack.infer import GenerationConfig, generate, make_decoder

DEFAULTS = {  # device -> preset, dtype, prompt length, new tokens, variants
    "cuda": ("llama-3.2-1b", "bfloat16", 128, 256, "bf16,int8,int4,transformers"),
    "cpu": ("gpt2", "float32", 32, 64, "fp32,transformers"),
}
# the held-out text: the team's shared data, or the copy carried to a lent GPU machine in .gpu_data/
_REPO = Path(__file__).resolve().parents[1]
HELD_OUT = next((p for p in (_REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                             _REPO / ".gpu_data" / "tinyshakespeare.txt") if p.is_file()),
                _REPO.parent / "shared" / "data" / "tinyshakespeare.txt")


def copy_bandwidth(device: str) -> float:
    """Bytes/s moved (read + write) by a large device-to-device copy."""
    n = 1 << 28 if device == "cuda" else 1 << 25
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / median(times)


def tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: everything but the embedding table (one row is read),
    unless the head is tied to it; only the top-k experts of an MoE layer are counted as read."""
    total, seen = 0, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name in ("embed.weight", "pos_embed.weight"):
            continue
        seen.add(id(p))
        total += tensor_bytes(p)
    for name, buf in model.named_buffers():
        if "weight" in name:
            total += tensor_bytes(buf)
    return total


def lmstack_run(model, decoder, prompt, new_tokens):
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, eos_token_ids=[])
    return generate(model, prompt, config, decoder=decoder)[0].outputs[0].token_ids


def hf_run(model, prompt, new_tokens):
    ids = torch.tensor(prompt, device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def held_out_ids(path: str | None, vocab: int, n: int) -> torch.Tensor:
    """Held-out text as byte ids (no tokenizer exists for random weights); a fixed string if no file."""
    text = Path(path).read_bytes() if path and Path(path).is_file() else (b"It was the best of times. " * 400)
    data = torch.tensor(list(text[-n - 1:]), dtype=torch.long)  # the end of the file: not a prompt source
    return data % vocab


@torch.inference_mode()
def quality(model, ref_logits, ids, window: int) -> tuple[float, float, float]:
    """(perplexity, mean KL(ref || model), top-1 agreement) over ids in windows."""
    nll, kl, agree, count = 0.0, 0.0, 0.0, 0
    for i, start in enumerate(range(0, ids.numel() - 1, window)):
        chunk = ids[start:start + window + 1].to(model.device)[None]
        logits = model(chunk[:, :-1]).logits.float()
        logp = torch.log_softmax(logits, -1)
        nll += -logp.gather(-1, chunk[:, 1:, None]).sum().item()
        ref = ref_logits[i]
        ref_logp = torch.log_softmax(ref, -1)
        kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        agree += (ref.argmax(-1) == logits.argmax(-1)).sum().item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count), kl / count, agree / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default=None, help="model shapes (default: llama-3.2-1b on cuda, gpt2 on cpu)")
    ap.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--variants", default=None,
                    help="comma list of: bf16/fp32 (unquantized), int8, int4, float8, transformers, "
                         "speculative-int4 / speculative-int8 (target = unquantized, draft = its quantized copy)")
    ap.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    ap.add_argument("--compile", default="auto", choices=["auto", "yes", "no"], help="lmstack's compiled path")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per variant (median)")
    ap.add_argument("--eval-text", default=str(HELD_OUT), help="held-out text for the perplexity change")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = ap.parse_args()
    preset, dtype_name, prompt_len, new_tokens, variants = DEFAULTS[args.device]
    preset = args.preset or preset
    dtype = getattr(torch, args.dtype or dtype_name)
    prompt_len = args.prompt_len or prompt_len
    new_tokens = args.new_tokens or new_tokens
    variants = (args.variants or variants).split(",")
    compile_ = None if args.compile == "auto" else args.compile == "yes"
    device = args.device

    base, _ = lmstack.load(preset, random_init=True, dtype=dtype, device=device, seed=0)
    base.eval()
    vocab = base.config.vocab_size
    prompt = [torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()]
    tmp = tempfile.TemporaryDirectory()
    base.save_pretrained(tmp.name)

    bandwidth = copy_bandwidth(device)
    models, runs, spec_stats = {}, {}, {}
    for v in variants:
        if v == "transformers":
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp.name, dtype=dtype,
                                                                   attn_implementation="sdpa").to(device).eval()
            models[v] = hf
            runs[v] = (lambda m=hf: hf_run(m, prompt, new_tokens)), (lambda m=hf: hf_run(m, prompt, 1))
            continue
        if v.startswith("speculative"):
            from lmstack.infer.quantize import quantize
            from lmstack.infer.speculative import speculative_generate

            draft = quantize(lmstack.load(tmp.name, dtype=dtype, device=device)[0].eval(), v.split("-")[-1],
                             group_size=args.group_size)
            tdec, ddec = make_decoder(base, compile_), make_decoder(draft, compile_)

            def spec(n, v=v, draft=draft, tdec=tdec, ddec=ddec):
                config = GenerationConfig(max_new_tokens=n, ignore_eos=True, eos_token_ids=[])
                out, spec_stats[v] = speculative_generate(base, draft, prompt[0], config, num_draft_tokens=args.draft_tokens,
                                                          target_decoder=tdec, draft_decoder=ddec)
                return out.outputs[0].token_ids
            models[v] = base
            runs[v] = (lambda s=spec: s(new_tokens)), (lambda s=spec: s(1))
            continue
        model = base if v in ("bf16", "fp32", "fp16") else lmstack.load(tmp.name, dtype=dtype, device=device)[0].eval()
        if v in ("int8", "int4", "float8"):
            from lmstack.infer.quantize import quantize

            quantize(model, v, group_size=args.group_size)
        # --compile auto times what a user's plain generate(model, ...) call does (its decoder,
        # compiled or packed, is kept per model); yes/no forces the path with an explicit decoder
        decoder = make_decoder(model, compile_) if compile_ is not None else None
        models[v] = model
        runs[v] = ((lambda m=model, d=decoder: lmstack_run(m, d, prompt, new_tokens)),
                   (lambda m=model, d=decoder: lmstack_run(m, d, prompt, 1)))

    reference_tokens = None
    for v, (full, first) in runs.items():  # warm-up: compiles graphs, fills caches
        start = time.perf_counter()
        tokens = full()
        first()
        print(f"warm-up {v}: {time.perf_counter() - start:.1f}s, first tokens {tokens[:8]}", flush=True)
        if v in ("bf16", "fp32"):
            reference_tokens = tokens
        elif v in ("transformers",) or v.startswith("speculative"):
            if reference_tokens is not None:
                same = sum(a == b for a, b in zip(tokens, reference_tokens))
                print(f"  {v} vs lmstack greedy tokens equal: {same}/{len(tokens)}")
    times = {v: [] for v in runs}
    first_times = {v: [] for v in runs}
    for _ in range(args.rounds):
        for v, (full, first) in runs.items():
            synchronize(device)
            if device == "cpu":  # let the last run's spin-waiting thread pools (OpenMP, BLAS) go idle
                time.sleep(0.5)
            start = time.perf_counter()
            first()
            synchronize(device)
            first_times[v].append(time.perf_counter() - start)
            if device == "cpu":
                time.sleep(0.5)
            start = time.perf_counter()
            full()
            synchronize(device)
            times[v].append(time.perf_counter() - start)

    ids = held_out_ids(args.eval_text, vocab, args.eval_tokens)
    window = 512
    with torch.inference_mode():
        ref_logits = [base(ids[s:s + window].to(device)[None]).logits.float()[0]
                      for s in range(0, ids.numel() - 1, window)]
        ref_logits = [r[: min(window, ids.numel() - 1 - s)] for r, s in zip(ref_logits, range(0, ids.numel() - 1, window))]
    rows, tps_of = [], {}
    for v in runs:
        total = median(times[v])
        tps_of[v] = new_tokens / total
        decode_tps = (new_tokens - 1) / max(total - median(first_times[v]), 1e-9)
        wbytes = weight_bytes_per_token(models[v]) if v != "transformers" else weight_bytes_per_token(base)
        limit = bandwidth / wbytes
        if v.startswith("speculative"):
            st = spec_stats[v]
            q = [f"acceptance {st.acceptance_rate:.1%}", f"{st.tokens_per_pass:.2f} tokens/target pass", ""]
        elif v != "transformers":
            ppl, kl, agree = quality(models[v], ref_logits, ids, window)
            q = [f"{ppl:.2f}", f"{kl:.4f}", f"{agree:.1%}"]
        else:
            q = ["(same weights)", "", ""]
        rows.append([f"lmstack {v}" if v != "transformers" else "transformers generate()", f"{tps_of[v]:,.1f}",
                     f"{decode_tps:,.1f}", f"{median(first_times[v]) * 1000:.1f}", f"{wbytes / 1e9:.3f}",
                     f"{100 * decode_tps / limit:.1f}%", *q])
    hf_tps = tps_of.get("transformers")
    if hf_tps:
        for row, v in zip(rows, runs):
            row.insert(2, f"{tps_of[v] / hf_tps:.2f}x")
    headers = ["variant", "tokens/s", *(["vs transformers"] if hf_tps else []), "decode tokens/s",
               "prefill+1st token ms", "weight GB read/token", "% of weight-read limit (decode)",
               "perplexity", "KL vs unquantized", "top-1 agree"]
    table = markdown_table(headers, rows)
    compiled = "compiled (static cache + CUDA graphs)" if (compile_ if compile_ is not None else device == "cuda") \
        else "eager"
    notes = (f"{preset} shapes, random weights (seed 0), {dtype_name if not args.dtype else args.dtype}, batch 1, "
             f"prompt {prompt_len}, {new_tokens} new tokens (EOS ignored), lmstack {compiled}, "
             f"median of {args.rounds} interleaved rounds; tokens/s = new tokens / generate() time incl. prefill; "
             f"device copy bandwidth {bandwidth / 1e12:.3f} TB/s, so the weight-read limit is "
             f"{bandwidth / weight_bytes_per_token(base):,.0f} tokens/s unquantized; quality on "
             f"{ids.numel()} held-out byte tokens of {Path(args.eval_text).name if Path(args.eval_text).is_file() else 'a fixed string'}")
    if device == "cpu":
        notes += ("; 0.5 s pause before every timed call so no run pays for the last one's spinning thread "
                  "pools; shared 2-core machine, other jobs running: absolute figures are noisy, the ratio less so")
    report(f"bench_decode: {preset} single-request decode ({device})", table, notes, args.no_record)
    tmp.cleanup()


if __name__ == "__main__":
    main()
