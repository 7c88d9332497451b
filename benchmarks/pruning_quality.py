"""Quality of pruning on the embedded model: WikiText-2 perplexity per method and pattern.

Dense, magnitude / Wanda / SparseGPT at 50% unstructured, 4:8 and 2:4, the best
method at 60% and 70%, and one layer-sharing row. Fixed chunks (ctx 512, the
first --chunks of the validation text); calibration windows drawn from the same
file with a fixed seed.

    python3 benchmarks/pruning_quality.py --out docs/results/pruning.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench.machine import cpu_name  # noqa: E402
from rarefy.eval.perplexity import perplexity  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402
from rarefy.sparsity.prune import prune_model  # noqa: E402
from rarefy.sparsity.share_layers import share_layers  # noqa: E402

TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--share", default="20,21", help="layer span for the sharing row")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    base = load_model(None, dtype="fp32")
    with open(TEXT, encoding="utf-8") as f:
        ids = base.tokenizer.encode(f.read(), add_special_tokens=False)
    rows = []

    def ppl(model):
        return perplexity(model, ids, ctx=512, max_chunks=a.chunks)

    def record(name, model, seconds=None, sparsity=None):
        r = ppl(model)
        rows.append((name, r.ppl, r.stderr, sparsity, seconds))
        print(f"{name}: ppl {r.ppl:.3f} ± {r.stderr:.3f}" + (f" ({seconds:.0f} s)" if seconds else ""), flush=True)

    record("dense", base.model)

    def pruned(method, **kw):
        m = copy.deepcopy(base.model)
        calib = None if method == "magnitude" else TEXT
        rep = prune_model(m, base.tokenizer, method, calib=calib, calib_samples=a.calib_samples,
                          calib_len=a.calib_len, progress=False, **kw)
        total = sum(x.shape[0] * x.shape[1] for x in rep.matrices)
        zeros = sum(x.sparsity * x.shape[0] * x.shape[1] for x in rep.matrices)
        return m, rep.seconds, zeros / total

    best = {}
    for label, kw in [("50% unstructured", {"sparsity": 0.5}), ("4:8", {"pattern": "4:8"}),
                      ("2:4", {"pattern": "2:4"})]:
        for method in ("magnitude", "wanda", "sparsegpt"):
            m, s, sp = pruned(method, **kw)
            record(f"{method}, {label}", m, s, sp)
            if label.startswith("50%"):
                best[method] = rows[-1][1]
            del m
    winner = min(best, key=best.get)
    for s in (0.6, 0.7):
        m, sec, sp = pruned(winner, sparsity=s)
        record(f"{winner}, {s:.0%} unstructured", m, sec, sp)
        del m
    start, end = (int(x) for x in a.share.split(","))
    m = copy.deepcopy(base.model)
    saved = share_layers(m, start, end, "mean")
    record(f"layers {start}..{end} shared (mean), {saved['params_dropped'] / 1e6:.1f}M params dropped", m)

    lines = [
        f"date: {datetime.date.today()}; device: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        f"model: embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32); WikiText-2 valid, first "
        f"{a.chunks} chunks of 512 tokens ({rows[0] and a.chunks * 511} scored tokens); calibration: "
        f"{a.calib_samples} windows x {a.calib_len} tokens of the same file (seed 0); all 210 decoder "
        f"linears pruned, embeddings/lm_head dense",
        "",
        "| model | perplexity | ± stderr | linear sparsity | prune time s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, p, se, sp, sec in rows:
        lines.append(f"| {name} | {p:.3f} | {se:.3f} | {'' if sp is None else f'{sp:.1%}'} | "
                     f"{'' if sec is None else f'{sec:.0f}'} |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Pruning quality, embedded model\n\nCommand: `python3 benchmarks/pruning_quality.py "
                    f"--chunks {a.chunks} --calib-samples {a.calib_samples} --out {a.out}`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
