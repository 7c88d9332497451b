"""End-to-end GPU decode of a pruned Llama-3-8B-shaped model against rarefy's own dense decode.

    PYTHONPATH=. python3 benchmarks/gpu_sparse_decode.py [--layers 32] [--variants dense,u50,b32]

Random bf16 weights (speed does not depend on the values), re-created from one seed for
every variant; each variant prunes every decoder projection by magnitude (u50: 50%
unstructured; 2:4; b32: 32x32 blocks, half of them removed), compiles it with
``use_sparse_weights`` (formats chosen and autotuned per matrix, dense where sparse measured
slower) and decodes 256 tokens after a 128-token prompt at batch 1 with the same engine as
dense (torch.compile + CUDA graph). Prints a table last and writes it as markdown to --out.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.config import ModelConfig  # noqa: E402
from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.layers.linear import DenseLinear  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402
from rarefy.layers.sparse_linear import use_sparse_weights  # noqa: E402
from rarefy.models.llama import DecoderLM  # noqa: E402
from rarefy.sparsity.masks import block_mask, nm_mask, unstructured_mask  # noqa: E402

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=8192)

PATTERNS = {
    "dense": None,
    "u50": lambda w: w * unstructured_mask(w.abs().float(), 0.5),
    "u75": lambda w: w * unstructured_mask(w.abs().float(), 0.75),
    "u90": lambda w: w * unstructured_mask(w.abs().float(), 0.9),
    "2:4": lambda w: w * nm_mask(w.abs().float(), 2, 4),
    "b32": lambda w: w * block_mask(w.abs().float(), 0.5, 32, 32),
}


def random_model(layers: int) -> DecoderLM:
    cfg = ModelConfig(**{**LLAMA3_8B, "num_layers": layers})
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = DecoderLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02)
    model.rotary.build(torch.device("cuda"))
    return model.eval()


def prune_in_place(model: DecoderLM, fn) -> None:
    for name, m in model.named_modules():
        if isinstance(m, DenseLinear) and not name.endswith("lm_head"):
            m.weight.data.copy_(fn(m.weight.data))


def weight_bytes(model) -> int:
    total = 0
    for m in model.modules():
        if hasattr(m, "compiled"):
            total += m.compiled.weight.nbytes
        elif isinstance(m, DenseLinear) or isinstance(m, torch.nn.Embedding):
            total += m.weight.numel() * m.weight.element_size()
    return total


def decode_rate(model, new_tokens: int, repeats: int) -> tuple[float, float]:
    prompt = [list(range(1, 129))]
    t0 = time.perf_counter()
    try:
        gen = Generator(model, None, compile=True)
        gen.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    except Exception as e:  # report, then fall back to the graph without torch.compile
        print(f"  torch.compile failed ({type(e).__name__}: {str(e)[:200]}); CUDA graph only", flush=True)
        gen = Generator(model, None, compile=False)
        gen.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    warm = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        _, stats = gen.generate(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
        rates.append(stats.decode_tok_s)
    return statistics.median(rates), warm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--variants", default="dense,u50,b32")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.cuda.get_device_name()
    rows = []
    dense_rate = None
    for name in a.variants.split(","):
        model = random_model(a.layers)
        t0 = time.perf_counter()
        n_sparse = n_total = 0
        if PATTERNS[name] is not None:
            prune_in_place(model, PATTERNS[name])
            reports = use_sparse_weights(model, batch_sizes=(1,), autotune=True)
            n_total = len(reports)
            n_sparse = sum(1 for r in reports if not r.get("kept"))
        compile_s = time.perf_counter() - t0
        wbytes = weight_bytes(model)
        rate, warm = decode_rate(model, a.new_tokens, a.repeats)
        if name == "dense":
            dense_rate = rate
        rows.append((name, n_sparse, n_total, wbytes, rate, warm, compile_s))
        print(f"{name}: {rate:.1f} tok/s, {n_sparse}/{n_total} matrices sparse, {wbytes / 1e9:.2f} GB, "
              f"compile {compile_s:.0f} s, warm-up {warm:.0f} s", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    lines = [f"device: {dev}; torch {torch.__version__}; Llama-3-8B shape ({a.layers} layers), random bf16; "
             f"batch 1, 128-token prompt, {a.new_tokens} new tokens, median of {a.repeats}", "",
             "| variant | sparse matrices | weight bytes/step GB | tok/s | vs dense | warm-up s | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, ns, nt, wb, rate, warm, cs in rows:
        vs = f"{rate / dense_rate:.2f}x" if dense_rate else "-"
        lines.append(f"| {name} | {ns}/{nt} | {wb / 1e9:.2f} | {rate:.1f} | {vs} | {warm:.0f} | {cs:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
