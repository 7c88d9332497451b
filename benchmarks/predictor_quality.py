"""Perplexity of the embedded model with neuron predictors masking MLP neurons.

    nice -n 19 python3 benchmarks/predictor_quality.py [--kind swiglu|linear] [--rank R] [--chunks 8]
        [--sparsities 0.25,0.4,0.5,0.6,0.7] [--samples 32] [--epochs N] [--oracle-threshold]
        [--skip-oracle] [--rank-sweep 32,64,128] [--finetune-epochs 2] [--out docs/results/activation-predictors.md]

--rank-sweep: held-out recall / precision (no perplexity) of kind --kind at s = 0.5 for each
rank, same layer. --finetune-epochs N: also kind swiglu with N epochs of BCE fine-tuning at
s = 0.5 (recall and perplexity), against the whitened SVD alone.

On a busy machine the sparsities can be run as separate processes, each writing --json-out
(--skip-dense on all but one), then rendered together:

    python3 benchmarks/predictor_quality.py --merge a.json,b.json --out docs/results/activation-predictors.md

Predictors are trained on windows of 512 tokens from the second half of WikiText-2 valid (1/8 of
those windows held out for recall / precision); perplexity is measured on the first chunks of 512
tokens of the first half (disjoint from every calibration window). For each target neuron
sparsity: the oracle (true per-token top-k of |silu(gate) * up|, and the true per-layer
threshold), predictors reading the same layer's MLP input, and predictors one layer ahead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.eval.perplexity import perplexity  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402
from rarefy.sparsity.predictor_training import collect_mlp_inputs, fit_predictors  # noqa: E402
from rarefy.sparsity.predictors import neuron_sparsity, oracle_mlp_sparsity, predicted_mlp_sparsity  # noqa: E402

VALID = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")
DATE = "2026-11-23"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6,0.7")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=None, help="default: linear 8, swiglu 0 (no fine-tuning)")
    ap.add_argument("--kind", default="swiglu", choices=["swiglu", "linear"])
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--skip-oracle", action="store_true", help="no oracle perplexity (known from another run)")
    ap.add_argument("--rank-sweep", default=None, help="comma list of ranks: recall at s = 0.5")
    ap.add_argument("--finetune-epochs", type=int, default=0, help="kind swiglu: also BCE fine-tuning at s = 0.5")
    ap.add_argument("--mode", default="threshold", choices=["threshold", "topk"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--json-out", default=None, help="raw results as JSON")
    ap.add_argument("--skip-dense", action="store_true", help="no dense perplexity (another part has it)")
    ap.add_argument("--oracle-threshold", action="store_true",
                    help="also the oracle with per-layer thresholds (one more perplexity run per sparsity)")
    ap.add_argument("--merge", default=None, help="comma list of --json-out files to render as one table")
    a = ap.parse_args()
    if a.merge:
        parts = [json.load(open(f)) for f in a.merge.split(",")]
        res = {"rows": sorted((r for p in parts for r in p["rows"]), key=lambda r: r["sparsity"])}
        res["dense_ppl"] = next(p["dense_ppl"] for p in parts if p["dense_ppl"] is not None)
        res["args"] = parts[0]["args"] | {"sparsities": ",".join(f"{r['sparsity']:g}" for r in res["rows"])}
        for k in ("windows", "rank", "collect_s"):
            res[k] = parts[0][k]
        render(res, a.out)
        return
    torch.set_num_threads(a.threads)
    loaded = load_model(None, gguf_blocks=False)
    model = loaded.model
    ids = loaded.tokenizer.encode(open(VALID, encoding="utf-8").read(), add_special_tokens=False)
    half = len(ids) // 2
    eval_ids = ids[:half]
    sparsities = [float(s) for s in a.sparsities.split(",")]

    def ppl(ctx):
        with torch.no_grad(), ctx as counts:
            p = perplexity(model, eval_ids, ctx=512, max_chunks=a.chunks).ppl
        return p, neuron_sparsity(counts) if counts is not None else 0.0

    import contextlib
    t0 = time.perf_counter()
    data = collect_mlp_inputs(model, ids[half:], seq_len=512, samples=a.samples, seed=0,
                              cache_activations=True)
    collect_s = time.perf_counter() - t0
    base = None if a.skip_dense else ppl(contextlib.nullcontext(None))[0]
    print(f"dense: ppl {base} (collect {collect_s:.0f} s, windows {data.windows})", flush=True)
    rows = []
    extra = {}

    def dump():
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump({"dense_ppl": base, "rows": rows, "extra": extra, "windows": data.windows,
                           "rank": preds.rank if rows else None, "collect_s": collect_s,
                           "args": {k: v for k, v in vars(a).items() if k not in ("out", "json_out", "merge")}},
                          f, indent=1)

    preds = None
    for s in sparsities:
        row = {"sparsity": s}
        if not a.skip_oracle:
            row["oracle_topk_ppl"], row["oracle_topk_sparsity"] = ppl(oracle_mlp_sparsity(model, s))
        for name, ahead in (("same", False), ("ahead", True)):
            t = time.perf_counter()
            preds = fit_predictors(model, data, s, rank=a.rank, ahead=ahead, mode=a.mode, epochs=a.epochs,
                                   kind=a.kind)
            row[f"{name}_train_s"] = time.perf_counter() - t
            row[f"{name}_recall"] = sum(preds.recall) / len(preds.recall)
            row[f"{name}_precision"] = sum(preds.precision) / len(preds.precision)
            row[f"{name}_ppl"], row[f"{name}_sparsity"] = ppl(predicted_mlp_sparsity(model, preds))
            if a.oracle_threshold and a.mode == "threshold" and not ahead:
                row["oracle_threshold_ppl"], row["oracle_threshold_sparsity"] = ppl(
                    oracle_mlp_sparsity(model, s, preds.thresholds))
        rows.append(row)
        print(json.dumps(row), flush=True)
        dump()
    if a.finetune_epochs and a.kind == "swiglu":
        for ahead in (False, True):
            t = time.perf_counter()
            p = fit_predictors(model, data, 0.5, rank=a.rank, ahead=ahead, mode=a.mode, epochs=a.finetune_epochs,
                               kind="swiglu")
            r = {"epochs": a.finetune_epochs, "ahead": ahead, "train_s": time.perf_counter() - t,
                 "recall": sum(p.recall) / len(p.recall), "precision": sum(p.precision) / len(p.precision)}
            r["ppl"], r["sparsity"] = ppl(predicted_mlp_sparsity(model, p))
            extra.setdefault("finetune", []).append(r)
            print("finetune", json.dumps(r), flush=True)
            dump()
    for rank in ([int(x) for x in a.rank_sweep.split(",")] if a.rank_sweep else []):
        t = time.perf_counter()
        p = fit_predictors(model, data, 0.5, rank=rank, mode=a.mode, epochs=a.epochs, kind=a.kind)
        r = {"rank": rank, "train_s": time.perf_counter() - t, "recall": sum(p.recall) / len(p.recall),
             "precision": sum(p.precision) / len(p.precision), "cost_vs_mlp": p.metadata()["cost_vs_mlp"]}
        extra.setdefault("rank_sweep", []).append(r)
        print("rank", json.dumps(r), flush=True)
        dump()
    res = {"dense_ppl": base, "rows": rows, "extra": extra, "windows": data.windows, "rank": preds.rank,
           "collect_s": collect_s, "args": {k: v for k, v in vars(a).items() if k not in ("out", "json_out", "merge")}}
    if base is not None and not a.skip_oracle:
        render(res, a.out)
    assert all(math.isfinite(r["same_ppl"]) for r in rows)


def render(res: dict, out: str | None) -> None:
    a = argparse.Namespace(**res["args"])
    base, rows, rank = res["dense_ppl"], res["rows"], res["rank"]

    def rel(p):
        return f"{p:.3f} ({p / base - 1:+.1%})"

    n_train, n_held = res["windows"]
    has_th = any("oracle_threshold_ppl" in r for r in rows)
    lines = [f"# Neuron predictors (Deja Vu style), embedded model ({DATE})", "",
             "Device: CPU, 2 cores. SmolLM2-135M-Instruct (embedded GGUF, CPU default fp16-stored weights, "
             f"30 layers, intermediate 1536). One low-rank predictor per MLP layer (hidden 576 -> rank {rank} "
             f"-> 1536), {a.mode} labels, class-weighted BCE, {a.epochs} epochs, trained on {n_train} windows "
             f"of 512 tokens from the second half of WikiText-2 valid; recall / precision (mean over layers) "
             f"of the top-k predicted masks on {n_held} further held-out windows of that half. Perplexity on "
             f"the first {a.chunks} chunks of 512 tokens of the first half (disjoint from all calibration "
             "windows). Masks zero MLP neurons only (attention stays dense); compute is dense with the mask "
             "applied (the quality reference).", "",
             f"Command: `nice -n 19 python3 benchmarks/predictor_quality.py --chunks {a.chunks} --sparsities "
             f"{a.sparsities} --samples {a.samples} --epochs {a.epochs} --mode {a.mode}"
             + (" --oracle-threshold" if has_th else "") + " --out docs/results/activation-predictors.md`", "",
             f"Dense perplexity: {base:.3f}.", "",
             "| neuron sparsity | oracle top-k ppl | "
             + ("oracle threshold ppl (sparsity) | " if has_th else "")
             + "predictor same layer: recall / precision | ppl | predictor one layer ahead: recall / precision "
             "| ppl |",
             "| --- | --- | " + ("--- | " if has_th else "") + "--- | --- | --- | --- |"]
    for r in rows:
        th = (f"{rel(r['oracle_threshold_ppl'])} ({r['oracle_threshold_sparsity']:.3f}) | "
              if "oracle_threshold_ppl" in r else ("- | " if has_th else ""))
        lines.append(f"| {r['sparsity']:.2f} | {rel(r['oracle_topk_ppl'])} | {th}"
                     f"{r['same_recall']:.3f} / {r['same_precision']:.3f} | {rel(r['same_ppl'])} | "
                     f"{r['ahead_recall']:.3f} / {r['ahead_precision']:.3f} | {rel(r['ahead_ppl'])} |")
    lines += ["", "Measured neuron sparsity of the predictor runs (same layer / ahead), top-k per token: "
              + ", ".join(f"{r['sparsity']:.2f} -> {r['same_sparsity']:.4f} / {r['ahead_sparsity']:.4f}"
                          for r in rows) + ".",
              "Training time per predictor set (30 layers, same layer / ahead; activations cached, machine "
              "shared with other jobs, so only indicative): "
              + ", ".join(f"{r['same_train_s']:.0f} s / {r['ahead_train_s']:.0f} s" for r in rows) + "."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
