"""Perplexity of the embedded model with TEAL-style activation thresholds (uniform allocation).

    python3 benchmarks/activation_quality.py [--chunks 8] [--out docs/results/activation-sparsity.md]

Thresholds are calibrated on windows from the second half of WikiText-2 valid and evaluated
on the first chunks of the first half (held out). The sparsity column is what was measured
on the evaluation text: zeroed entries over all projection inputs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.eval.perplexity import perplexity  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402
from rarefy.sparsity.activation import calibrate_thresholds, measured_sparsity, sparsify_activations  # noqa: E402

VALID = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    loaded = load_model(None)
    ids = loaded.tokenizer.encode(open(VALID, encoding="utf-8").read(), add_special_tokens=False)
    half = len(ids) // 2
    sparsities = [float(s) for s in a.sparsities.split(",")]
    t0 = time.perf_counter()
    th = calibrate_thresholds(loaded.model, ids[half:], sparsities, seq_len=512, samples=a.samples)
    calib_s = time.perf_counter() - t0
    eval_ids = ids[:half]
    with torch.no_grad():
        base = perplexity(loaded.model, eval_ids, ctx=512, max_chunks=a.chunks).ppl
    rows = [(0.0, 0.0, base)]
    print(f"dense: ppl {base:.3f}", flush=True)
    for s in sparsities:
        with torch.no_grad(), sparsify_activations(loaded.model, th.for_sparsity(s)) as counts:
            ppl = perplexity(loaded.model, eval_ids, ctx=512, max_chunks=a.chunks).ppl
        rows.append((s, measured_sparsity(counts), ppl))
        print(f"target {s:.2f}: measured {rows[-1][1]:.3f}, ppl {ppl:.3f} ({ppl / base - 1:+.1%})", flush=True)
    lines = [f"# Activation sparsity quality, embedded model ({datetime.date.today().isoformat()})", "",
             f"SmolLM2-135M-Instruct (embedded GGUF, CPU default fp16-stored weights); thresholds on the input "
             f"of every projection (q/k/v, o, gate/up, down), uniform allocation, calibrated on {a.samples} "
             f"windows of 512 tokens from the second half of WikiText-2 valid ({calib_s:.0f} s); perplexity on "
             f"the first {a.chunks} chunks of 512 tokens of the first half (held out).", "",
             "Command: `python3 benchmarks/activation_quality.py --chunks "
             f"{a.chunks} --sparsities {a.sparsities}`", "",
             "| target sparsity | measured sparsity (all inputs) | perplexity | vs dense |",
             "| --- | --- | --- | --- |"]
    for s, m, p in rows:
        lines.append(f"| {s:.2f} | {m:.3f} | {p:.3f} | {p / base - 1:+.1%} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
