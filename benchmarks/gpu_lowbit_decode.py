"""End-to-end decode of a Llama-3-8B-shaped model with ternary or int8 projections (H100).

Issue 7: a ternary model's decode >= 4x rarefy's bf16 decode. Random bf16 weights; the
projections are quantized (lm_head and embeddings stay bf16, as `rarefy quantize` does by
default) and run through the fused Triton kernels (TernaryLinear / Int8Linear "fused" mode).
Both sides use rarefy's Generator with CUDA graphs and torch.compile.

    PYTHONPATH=. python3 benchmarks/gpu_lowbit_decode.py [--layers 32] [--formats ternary,int8,ternary+int8head,ternary_a8+int8head,ternary_a8+int8head+opquant]

q/k/v and gate/up are stacked into one low-bit launch each (fuse_projections), as the bf16
model's are. "+int8head" also quantizes the lm_head to int8; "+opquant" (W1.58A8) quantizes the activations in a
Triton launch of its own instead of letting torch.compile fuse it into the producer.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, ".")
import rarefy.kernels.lowbit_gemv as lg  # noqa: E402
from benchmarks.gpu_serve import random_model  # noqa: E402
from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.layers.lowbit_linear import TernaryLinear, set_lowbit_mode  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402
from rarefy.lowbit.quantize import quantize_model  # noqa: E402


def decode_rate(model, tokens: int, compile: bool) -> tuple[float, list[int]]:
    gen = Generator(model, None, compile=compile)
    prompt = [[int(t) for t in torch.randint(0, 128000, (32,), generator=torch.Generator().manual_seed(0))]]
    p = SamplingParams(max_tokens=tokens, ignore_eos=True)
    gen.generate(prompt, p)
    (c,), st = gen.generate(prompt, p)
    return st.decode_tok_s, c.token_ids


def profile_decode(model, compile: bool, tokens: int = 16) -> None:
    """Top GPU kernels of a short decode (after the warm-up in decode_rate)."""
    from torch.profiler import ProfilerActivity, profile
    gen = Generator(model, None, compile=compile)
    prompt = [[int(t) for t in torch.randint(0, 128000, (32,), generator=torch.Generator().manual_seed(0))]]
    p = SamplingParams(max_tokens=tokens, ignore_eos=True)
    gen.generate(prompt, p)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate(prompt, p)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)


def weight_bytes(model) -> int:
    n = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name or "rotary" in name or "weight_cache" in name:
            continue
        n += t.numel() * t.element_size()
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--formats", default="ternary,int8,ternary+int8head")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print each format's top GPU kernels (torch.profiler)")
    a = ap.parse_args()
    compile = not a.no_compile
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    model = random_model(a.layers)
    dense_bytes = weight_bytes(model)
    base, _ = decode_rate(model, a.tokens, compile)
    rows.append(("bf16", dense_bytes, base))
    print(f"bf16: {base:.1f} tok/s, {dense_bytes / 1e9:.2f} GB", flush=True)
    for fmt in a.formats.split(","):
        del model
        torch.cuda.empty_cache()
        model = random_model(a.layers)
        body, _, head = fmt.partition("+")
        # "+opquant": the activations' int8 quantization as its own Triton launch (before the
        # eighth session), else traced and fused by torch.compile into the kernel producing x
        lg.TRACED_DP4A_QUANT = not head.endswith("opquant")
        head = head.removesuffix("opquant").removesuffix("+")
        quantize_model(model, "ternary" if body == "ternary_a8" else body)
        if body == "ternary_a8":  # BitNet's W1.58A8: int8 activations per token (the dp4a kernel)
            for mod in model.modules():
                if isinstance(mod, TernaryLinear):  # the int8 lm_head keeps float activations
                    mod.act_quant = "int8"
        if head == "int8head":  # the lm_head too, int8 per output channel (1.05 GB -> 0.53 GB)
            quantize_model(model, "int8", skip=())
        elif head:
            raise SystemExit(f"unknown format suffix {head!r} (known: +int8head)")
        set_lowbit_mode(model, "fused")
        nbytes = weight_bytes(model)
        try:
            rate, _ = decode_rate(model, a.tokens, compile)
        except Exception as e:  # report and go on
            print(f"{fmt}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rows.append((fmt, nbytes, rate))
        print(f"{fmt}: {rate:.1f} tok/s, {nbytes / 1e9:.2f} GB", flush=True)
        if a.profile:
            profile_decode(model, compile)
    print("\n| weights | bytes read per token (GB) | decode tok/s (batch 1) | vs bf16 | bytes ratio (ideal) |")
    print("| --- | --- | --- | --- | --- |")
    for fmt, nbytes, rate in rows:
        print(f"| {fmt} | {nbytes / 1e9:.2f} | {rate:.1f} | {rate / base:.2f}x | {dense_bytes / nbytes:.2f}x |")


if __name__ == "__main__":
    main()
