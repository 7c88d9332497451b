"""Perplexity of the embedded model with activation sparsity: every mode (threshold, topk,
adaptive) with uniform and greedy allocation, all in one run.

    python3 benchmarks/activation_quality.py [--chunks 8] [--out docs/results/activation-sparsity.md]

Calibration statistics come from windows of the second half of WikiText-2 valid (one dense
pass shared by all configurations); perplexity is measured on the first chunks of the first
half (held out). Beside each perplexity: the sparsity measured on the evaluation text, as the
fraction of zeroed entries weighted by the weights each input gates (= fraction of decoder
projection weight reads skipped) and weighted by entries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.eval.perplexity import perplexity  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402
from rarefy.sparsity.activation import (calibrate_from_statistics, collect_statistics, input_weights,  # noqa: E402
                                        sparsify_activations, sparsity_report)

VALID = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")
CONFIGS = [("threshold", False), ("threshold", True), ("topk", False), ("topk", True), ("adaptive", False)]
TARGETS = {0.25: 0.03, 0.40: 0.12, 0.50: 0.30}  # issue 5: greedy + best mode, ppl increase at most


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--greedy-windows", type=int, default=2)
    ap.add_argument("--greedy-tokens", type=int, default=256)
    ap.add_argument("--greedy-step", type=float, default=0.05)
    ap.add_argument("--configs", default=",".join(f"{m}:{'greedy' if g else 'uniform'}" for m, g in CONFIGS))
    ap.add_argument("--date", default=None, help="date written in the report (default: today)")
    ap.add_argument("--device-label", default="CPU, 2 cores")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    configs = [(c.split(":")[0], c.split(":")[1] == "greedy") for c in a.configs.split(",")]
    t_start = time.perf_counter()
    loaded = load_model(None)
    model = loaded.model
    ids = loaded.tokenizer.encode(open(VALID, encoding="utf-8").read(), add_special_tokens=False)
    half = len(ids) // 2
    sparsities = [float(s) for s in a.sparsities.split(",")]
    t0 = time.perf_counter()
    data = collect_statistics(model, ids[half:], seq_len=512, samples=a.samples, keep_windows=a.greedy_windows)
    collect_s = time.perf_counter() - t0
    print(f"statistics: {collect_s:.0f} s", flush=True)
    eval_ids = ids[:half]
    with torch.no_grad():
        base = perplexity(model, eval_ids, ctx=512, max_chunks=a.chunks).ppl
    print(f"dense: ppl {base:.3f}", flush=True)
    weights = input_weights(model)
    decoder_w = sum(weights.values())
    head_w = model.lm_head.weight.numel()
    rows, calib = [], {}
    for mode, greedy in configs:
        name = f"{mode} {'greedy' if greedy else 'uniform'}"
        t0 = time.perf_counter()
        th = calibrate_from_statistics(model, data, sparsities, mode, greedy=greedy, greedy_step=a.greedy_step,
                                       greedy_tokens=a.greedy_tokens)
        calib[name] = {"seconds": time.perf_counter() - t0}
        if greedy:
            err = th.greedy["error"]
            calib[name]["error_ratio"] = {k: statistics.mean(g / u for g, u in zip(v["greedy"], v["uniform"]) if u > 0)
                                          for k, v in err.items()}
            calib[name]["uniform_kept"] = th.greedy["uniform_kept"]
            calib[name]["allocation"] = {
                f"{s:.4f}": {inp: statistics.mean(v for n, v in th.sparsity_of_inputs(s).items() if n.endswith(inp))
                             for inp in ("attn_in", "o_in", "mlp_in", "down_in")} for s in sparsities}
        print(f"{name}: calibrated in {calib[name]['seconds']:.0f} s", flush=True)
        for s in sparsities:
            with torch.no_grad(), sparsify_activations(model, th.rule(s)) as counts:
                ppl = perplexity(model, eval_ids, ctx=512, max_chunks=a.chunks).ppl
            rep = sparsity_report(counts, model)
            rows.append({"mode": mode, "allocation": "greedy" if greedy else "uniform", "target": s,
                         "weighted": rep["weighted"], "entries": rep["entries"], "ppl": ppl, "delta": ppl / base - 1})
            print(f"  target {s:.2f}: weighted {rep['weighted']:.3f}, entries {rep['entries']:.3f}, "
                  f"ppl {ppl:.3f} ({ppl / base - 1:+.1%})", flush=True)
        # written after every configuration, so an interrupted run keeps what it measured
        text = write(a, {"dense": base, "rows": rows, "calibration": calib, "collect_s": collect_s,
                         "total_s": time.perf_counter() - t_start, "decoder_weights": decoder_w,
                         "head_weights": head_w, "args": vars(a)})
    print("\n" + text)


def write(a, result) -> str:
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=1)
    text = report(result, a)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return text


def report(r, a) -> str:
    import datetime
    date = a.date or datetime.date.today().isoformat()
    base = r["dense"]
    rows = r["rows"]
    lines = [f"# Activation sparsity quality, embedded model ({date})", "",
             f"Device: {a.device_label}. SmolLM2-135M-Instruct (embedded GGUF, fp32 on CPU). Every projection "
             "input is sparsified: attn_in (read by q, k and v), o_in, mlp_in (read by gate and up), down_in; "
             "the LM head stays dense. Calibration: one dense pass over "
             f"{a.samples} windows of 512 tokens from the second half of WikiText-2 valid ({r['collect_s']:.0f} s), "
             f"shared by all rows; greedy allocation on the layer inputs of the first {a.greedy_windows} of those "
             f"windows, error on {a.greedy_tokens} of their tokens, step {a.greedy_step}. Perplexity: the first "
             f"{a.chunks} chunks of 512 tokens of the first half (held out). Whole run: {r['total_s'] / 60:.0f} min.",
             "",
             "Command: `nice -n 19 python3 benchmarks/activation_quality.py --chunks "
             f"{a.chunks} --sparsities {a.sparsities} --date {date} --out docs/results/activation-sparsity.md`", "",
             "Sparsity columns are measured on the evaluation text: *weighted* = zeroed fraction of each input "
             "weighted by the weights it gates (q+k+v, o, gate+up, down), i.e. the fraction of decoder "
             "projection weight reads skipped; *entries* = zeroed entries over all input entries.", "",
             f"Dense perplexity: **{base:.3f}**.", "",
             "| mode | allocation | target | weighted sparsity | entries sparsity | perplexity | vs dense |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        lines.append(f"| {x['mode']} | {x['allocation']} | {x['target']:.2f} | {x['weighted']:.3f} | "
                     f"{x['entries']:.3f} | {x['ppl']:.3f} | {x['delta']:+.1%} |")
    lines += ["", "## Against the issue's targets (greedy allocation, best mode)", "",
              "| target sparsity | allowed | best greedy row | weighted sparsity | vs dense | met? |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s, allowed in TARGETS.items():
        cands = [x for x in rows if x["allocation"] == "greedy" and abs(x["target"] - s) < 1e-9]
        if not cands:
            continue
        best = min(cands, key=lambda x: x["ppl"])
        lines.append(f"| {s:.2f} | +{allowed:.0%} | {best['mode']} | {best['weighted']:.3f} | {best['delta']:+.1%} | "
                     f"{'met' if best['delta'] <= allowed else 'missed'} |")
    lines += ["", "## Calibration", "",
              "| configuration | calibration time | greedy/uniform layer error (mean ratio per level) | "
              "layers kept uniform per level |", "| --- | --- | --- | --- |"]
    for name, c in r["calibration"].items():
        ratio = ", ".join(f"{float(k):.2f}: {v:.2f}" for k, v in c.get("error_ratio", {}).items()) or "-"
        kept = ", ".join(f"{float(k):.2f}: {v}" for k, v in c.get("uniform_kept", {}).items()) or "-"
        lines.append(f"| {name} | {c['seconds']:.0f} s | {ratio} | {kept} |")
    alloc_rows = [(n, c["allocation"]) for n, c in r["calibration"].items() if "allocation" in c]
    if alloc_rows:
        lines += ["", "Greedy allocation, mean input sparsity over the 30 layers:", "",
                  "| configuration | level | attn_in | o_in | mlp_in | down_in |", "| --- | --- | --- | --- | --- | --- |"]
        for n, al in alloc_rows:
            for k, v in al.items():
                lines.append(f"| {n} | {float(k):.2f} | " + " | ".join(f"{v[i]:.3f}" for i in
                                                                         ("attn_in", "o_in", "mlp_in", "down_in")) + " |")
    share = r["decoder_weights"] / (r["decoder_weights"] + r["head_weights"])
    lines += ["", f"The decoder projections hold {r['decoder_weights'] / 1e6:.1f} M weights; the dense LM head "
              f"(tied embeddings) {r['head_weights'] / 1e6:.1f} M. Counting the head, the fraction of all weight "
              f"reads skipped is the weighted sparsity times {share:.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
