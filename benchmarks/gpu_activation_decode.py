"""End-to-end GPU decode with activation sparsity (TEAL-style thresholds) against rarefy's dense decode.

    PYTHONPATH=. python3 benchmarks/gpu_activation_decode.py [--layers 32] [--levels 0.25,0.4,0.5]

Llama-3-8B shape with random bf16 weights (speed does not depend on the values; quality is
measured on the real small model on the CPU: docs/results/activation-sparsity.md). Thresholds
are calibrated on the same random model (random token windows), every decoder projection is
swapped for the input-sparse kernels (use_activation_sparsity), and decode runs at batch 1
with the same engine as dense (torch.compile + CUDA graph). The sparsity actually reached is
measured with the threshold hooks on held-out random tokens and printed beside each speed.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_sparse_decode import decode_rate, random_model  # noqa: E402

from rarefy.layers.activation_sparse import use_activation_sparsity  # noqa: E402
from rarefy.sparsity.activation import calibrate_thresholds, measured_sparsity, sparsify_activations  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--levels", default="0.25,0.4,0.5")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    levels = [float(v) for v in a.levels.split(",")]
    model = random_model(a.layers)
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (4096,), generator=gen).tolist()
    held = torch.randint(0, vocab, (1, 256), generator=gen).cuda()
    t0 = time.perf_counter()
    with torch.no_grad():
        th = calibrate_thresholds(model, calib, levels, seq_len=256, samples=4)
        reached = {}
        for s in levels:
            with sparsify_activations(model, th.for_sparsity(s)) as counts:
                model(held)
            reached[s] = measured_sparsity(counts)
    print(f"calibrated in {time.perf_counter() - t0:.0f} s; reached " +
          ", ".join(f"{s:.2f}->{r:.3f}" for s, r in reached.items()), flush=True)
    rows = []
    dense, warm = decode_rate(model, a.new_tokens, a.repeats)
    rows.append(("dense", 0.0, dense, warm))
    print(f"dense: {dense:.1f} tok/s", flush=True)
    for s in levels:
        del model
        gc.collect()
        torch.cuda.empty_cache()
        model = random_model(a.layers)
        use_activation_sparsity(model, th.for_sparsity(s))
        rate, warm = decode_rate(model, a.new_tokens, a.repeats)
        rows.append((f"threshold {s:.0%}", reached[s], rate, warm))
        print(f"{s}: {rate:.1f} tok/s ({rate / dense:.2f}x)", flush=True)
    lines = [f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; Llama-3-8B shape "
             f"({a.layers} layers), random bf16; batch 1, 128-token prompt, {a.new_tokens} new tokens, "
             f"median of {a.repeats}; {time.strftime('%Y-%m-%d')}", "",
             "| variant | sparsity reached (all projection inputs) | tok/s | vs dense | warm-up s |",
             "| --- | --- | --- | --- | --- |"]
    for name, r, rate, warm in rows:
        lines.append(f"| {name} | {r:.3f} | {rate:.1f} | {rate / dense:.2f}x | {warm:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
