"""Quality of low-bit weights on the embedded model: WikiText-2 perplexity and greedy agreement.

fp32 baseline (the Q4_1 GGUF dequantized to fp32) against int8 per output channel and per
group, and ternary (BitNet b1.58 absmean) per tensor and per group, all decoder projections
quantized, embeddings and the tied lm_head dense. The same fixed chunks (ctx 512, the first
--chunks of the validation text) for every row; the ratio column is the paired estimate
exp(mean NLL difference) with a standard error over chunks. Low-bit layers run in the
dequantize-once-and-cache mode (bit-identical to the reference forward, faster).

    python3 benchmarks/lowbit_quality.py --chunks 100 --out docs/results/lowbit-quality.md
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench.machine import cpu_name  # noqa: E402
from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.eval.perplexity import chunk_tokens, token_nlls  # noqa: E402
from rarefy.layers.lowbit_linear import set_lowbit_mode  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402
from rarefy.lowbit.quantize import quantize_model  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402

TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was",
           "Explain why the sky is blue.", "List three prime numbers:", "The best way to learn Python is"]
# 128 does not divide the hidden size 576 of the embedded model, so the group rows use
# 64 and 192, the nearest sizes dividing both 576 and 1536.
# ("fp16", None): projection weights rounded to fp16 (the CPU default storage), a yardstick
# for how much greedy text moves under a tiny weight perturbation.
CONFIGS = [("fp16", None), ("int8", None), ("int8", 64), ("int8", 192), ("ternary", None), ("ternary", 64),
           ("ternary", 192)]


def describe(fmt, group):
    if fmt == "fp16":
        return "fp16-rounded projection weights (reference)"
    if group:
        return f"{fmt}, group {group}"
    return f"{fmt}, per {'tensor' if fmt == 'ternary' else 'output channel'}"


def bits_per_weight(model) -> float:
    """Stored bits per projection weight (packed values + scales)."""
    bits = n = 0
    for m in model.modules():
        if hasattr(m, "weight_scale") and hasattr(m, "fmt"):
            n += m.in_features * m.out_features
            for name, b in m.named_buffers():
                if name != "weight_cache":
                    bits += 8 * b.numel() * b.element_size()
    return bits / n


def weight_error(base, model) -> float:
    """Mean over the quantized matrices of ||W - W_hat|| / ||W||."""
    errs = []
    for name, m in model.named_modules():
        if hasattr(m, "dequantized_weight"):
            w = base.get_submodule(name).weight
            errs.append(((w - m.dequantized_weight(w.dtype)).norm() / w.norm()).item())
    return sum(errs) / len(errs)


def fp16_error(base) -> float:
    errs = [((p - p.half().float()).norm() / p.norm()).item() for n, p in base.named_parameters()
            if n.endswith("_proj.weight")]
    return sum(errs) / len(errs)


def greedy(model, tok, n):
    ids = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    out, _ = Generator(model, tok, use_cuda_graph=False, compile=False).generate(ids, params)
    return [c.token_ids for c in out]


def agreement(ref, got):
    """(share of positions with the same token, share of tokens before the first difference)."""
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    prefix = 0
    for r, g in zip(ref, got):
        k = 0
        while k < len(r) and r[k] == g[k]:
            k += 1
        prefix += k
    total = sum(len(r) for r in ref)
    return same / total, prefix / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--configs", default=None,
                    help="comma list of rows, e.g. fp16,int8,int8:64,ternary:192 (default: all)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    configs = CONFIGS
    if a.configs:
        configs = [(c.split(":")[0], int(c.split(":")[1]) if ":" in c else None) for c in a.configs.split(",")]
    torch.manual_seed(0)
    base = load_model(None, dtype="fp32")
    with open(TEXT, encoding="utf-8") as f:
        ids = base.tokenizer.encode(f.read(), add_special_tokens=False)
    chunks = chunk_tokens(ids, 512, a.chunks)
    command = " ".join(["python3 benchmarks/lowbit_quality.py"] + sys.argv[1:])
    rows = []

    def nlls(model):
        t = time.time()
        v = token_nlls(model, chunks)
        return v.view(chunks.shape[0], -1), time.time() - t

    ref, secs = nlls(base.model)
    ref_tokens = greedy(base.model, base.tokenizer, a.greedy_tokens)
    ppl0 = math.exp(ref.mean().item())
    se0 = ppl0 * ref.std().item() / math.sqrt(ref.numel())
    rows.append(("fp32 (Q4_1 dequantized)", ppl0, se0, None, None, 32.0, None, None, None))
    print(f"fp32: ppl {ppl0:.3f} ({secs:.0f} s)", flush=True)
    write(a, command, chunks, rows)
    for fmt, group in configs:
        m = copy.deepcopy(base.model)
        t = time.time()
        if fmt == "fp16":
            for name, p in m.named_parameters():
                if name.endswith("_proj.weight"):
                    p.data = p.data.half().float()
        else:
            quantize_model(m, fmt, group)
        qsecs = time.time() - t
        set_lowbit_mode(m, "cache", torch.float32)
        v, secs = nlls(m)
        ppl = math.exp(v.mean().item())
        se = ppl * v.std().item() / math.sqrt(v.numel())
        diff = (v - ref).mean(1)  # per-chunk mean NLL difference: chunks are the independent units
        ratio = math.exp(diff.mean().item())
        ratio_se = ratio * diff.std().item() / math.sqrt(len(diff))
        agree = agreement(ref_tokens, greedy(m, base.tokenizer, a.greedy_tokens))
        fp16 = fmt == "fp16"
        rows.append((describe(fmt, group), ppl, se, ratio, ratio_se, 16.0 if fp16 else bits_per_weight(m), agree,
                     None if fp16 else qsecs, fp16_error(base.model) if fp16 else weight_error(base.model, m)))
        print(f"{describe(fmt, group)}: ppl {ppl:.3f}, x{ratio:.4f} ± {ratio_se:.4f}, greedy {agree}, "
              f"quantized in {qsecs:.1f} s ({secs:.0f} s eval)", flush=True)
        write(a, command, chunks, rows)
        del m


def num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def write(a, command, chunks, rows):
    if not a.out:
        return
    n_tok = chunks.shape[0] * (chunks.shape[1] - 1)
    lines = [
        "# Low-bit quality, embedded model",
        "",
        f"Command: `{command}`",
        "",
        f"date: 2026-11-23; machine: {cpu_name()}, 2 cores shared, 1 torch thread, torch {torch.__version__}",
        f"model: embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32); WikiText-2 valid, first "
        f"{chunks.shape[0]} chunks of 512 tokens ({n_tok} scored tokens); all 210 decoder projections "
        "quantized, embeddings and the tied lm_head dense; greedy agreement: "
        f"{len(PROMPTS)} prompts x {a.greedy_tokens} new tokens against the fp32 model",
        "",
        "| weights | bits / weight | weight rel. error | perplexity | ± stderr | ppl ratio to fp32 "
        "| ± stderr (paired) | greedy: same token | greedy: before 1st difference | quantize s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, ppl, se, ratio, rse, bits, agree, qs, werr in rows:
        lines.append(f"| {name} | {bits:.2f} | " + ("" if werr is None else f"{werr:.4f}") + f" | {num(ppl)} | "
                     f"{num(se)} | " + ("" if ratio is None else num(ratio, 4)) + " | "
                     + ("" if rse is None else num(rse, 4)) + " | "
                     + ("" if agree is None else f"{agree[0]:.1%}") + " | "
                     + ("" if agree is None else f"{agree[1]:.1%}") + " | "
                     + ("" if qs is None else f"{qs:.1f}") + " |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
