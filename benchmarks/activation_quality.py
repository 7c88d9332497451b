"""Perplexity of the embedded model with activation sparsity: every mode (threshold, topk,
adaptive), criterion (magnitude |x|, weighted |x| * column norm) and allocation (uniform,
greedy), all in one run.

    python3 benchmarks/activation_quality.py [--chunks 8] [--out docs/results/activation-sparsity.md]

A configuration is ``mode:allocation`` (allocation uniform, greedy or global) followed by
options: ``weighted`` (criterion), ``seq`` (sequential calibration: thresholds from
activations already sparsified upstream),
``up`` (greedy searched on inputs with the earlier layers sparsified), ``refine`` (global
allocation re-estimated once at its own operating point), ``match`` (global allocation's nominal
average moved, 3 rounds, until the sparsity measured on the calibration windows with upstream
inputs sparsified is the target), a rotation of the sparsified inputs
(rarefy.sparsity.activation_rotation, pca basis from 8 calibration windows): ``vo`` (per key/value
head, folded: free), ``res`` (one rotation of the residual stream, folded: free), ``layer`` or
``layerN`` (per layer, online: a d x d or block-diagonal d x N matmul per attention / MLP input,
counted against the sparsity in the *net* column), e.g. ``threshold:greedy:weighted:seq``,
``threshold:global:vo``.

Calibration statistics come from windows of the second half of WikiText-2 valid (one dense
pass shared by all configurations); perplexity is measured on the first chunks of the first
half (held out). Beside each perplexity: the sparsity measured on the evaluation text, as the
fraction of zeroed entries weighted by the weights each input gates (= fraction of decoder
projection weight reads skipped) and weighted by entries.
"""

from __future__ import annotations

import argparse
import copy
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
# in order of priority: the report is rewritten after every configuration, so a run cut short
# keeps the first ones
CONFIGS = ["threshold:uniform", "threshold:global", "threshold:greedy", "threshold:uniform:weighted",
           "threshold:uniform:seq", "threshold:global:refine", "threshold:greedy:weighted", "threshold:greedy:up",
           "topk:uniform", "topk:greedy", "adaptive:uniform"]
OPTIONS = ("weighted", "seq", "up", "refine", "vo", "res", "match")
MATCH_ROUNDS = 3
ROTATION_WINDOWS = 8
ALLOCS = ("uniform", "greedy", "global")


def parse_config(text: str) -> dict:
    parts = text.split(":")
    def known(p):
        return p in OPTIONS or (p.startswith("layer") and (p == "layer" or p[5:].isdigit()))
    if len(parts) < 2 or parts[1] not in ALLOCS or not all(known(p) for p in parts[2:]):
        raise SystemExit(f"bad configuration {text!r}: mode:uniform|greedy|global[:weighted][:seq][:up][:refine]"
                         "[:vo][:res|:layer[N]]")
    opts = set(parts[2:])
    layer = [p for p in parts[2:] if p.startswith("layer")]
    rotation = tuple(k for k in ("vo", "res") if k in opts) + tuple(layer)
    return {"mode": parts[0], "allocation": parts[1], "greedy": parts[1] == "greedy",
            "criterion": "weighted" if "weighted" in opts else "magnitude", "sequential": "seq" in opts, "upstream": "sparse" if "up" in opts else "dense",
            "refine": int("refine" in opts), "rotation": rotation,
            "match": MATCH_ROUNDS if "match" in opts else 0}


def config_name(c: dict) -> str:
    return " ".join([c["mode"], c["criterion"], c["allocation"]]
                    + (["sparse-upstream"] if c["upstream"] == "sparse" else [])
                    + (["refined"] if c["refine"] else [])
                    + (["matched"] if c.get("match") else [])
                    + (["sequential"] if c["sequential"] else [])
                    + ([f"rotated {'+'.join(c['rotation'])}"] if c.get("rotation") else []))


def rotate(model, rotation, ids):
    """A rotated copy of `model` (rarefy.sparsity.activation_rotation); its online cost in
    weights read per token (0 for the folded kinds)."""
    from rarefy.sparsity.activation_rotation import rotate_model

    kinds = [{"res": "residual"}.get(k, "layer" if k.startswith("layer") else k) for k in rotation]
    block = next((int(k[5:]) for k in rotation if k.startswith("layer") and k[5:]), None)
    gen = torch.Generator().manual_seed(7)
    starts = torch.randint(0, len(ids) - 512, (ROTATION_WINDOWS,), generator=gen).tolist()
    m = copy.deepcopy(model)
    rotate_model(m, kinds, [ids[s:s + 512] for s in starts], "pca", block)
    online = 0
    if "layer" in kinds:
        d = model.config.hidden_size
        online = 2 * model.config.num_layers * d * min(block or d, d)
    return m, online
TARGETS = {0.25: 0.03, 0.40: 0.12, 0.50: 0.30}  # issue 5: greedy + best mode, ppl increase at most


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--greedy-windows", type=int, default=2)
    ap.add_argument("--greedy-tokens", type=int, default=256)
    ap.add_argument("--greedy-step", type=float, default=0.05)
    ap.add_argument("--global-windows", type=int, default=1, help="windows the global sensitivity curves use")
    ap.add_argument("--global-tokens", type=int, default=512, help="tokens of each of those windows")
    ap.add_argument("--global-method", default="fisher", choices=("fisher", "kl"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--sequential-windows", type=int, default=None,
                    help="calibration windows of the sequential pass (default: all --samples)")
    ap.add_argument("--date", default=None, help="date written in the report (default: today)")
    ap.add_argument("--device-label", default="CPU, 2 cores")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    configs = [parse_config(c) for c in a.configs.split(",")]
    criteria = sorted({c["criterion"] for c in configs}, key=("magnitude", "weighted").index)
    t_start = time.perf_counter()
    loaded = load_model(None, dtype="fp16w")  # fp16-stored dense weights, as in every earlier run
    model = loaded.model
    ids = loaded.tokenizer.encode(open(VALID, encoding="utf-8").read(), add_special_tokens=False)
    half = len(ids) // 2
    sparsities = [float(s) for s in a.sparsities.split(",")]
    t0 = time.perf_counter()
    data = collect_statistics(model, ids[half:], seq_len=512, samples=a.samples,
                              keep_windows=a.greedy_windows if any(c["allocation"] != "uniform" for c in configs)
                              else 0,
                              criteria=criteria)
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
    variants = {(): (model, data, 0, base)}  # rotation -> (model, its statistics, online weights, dense ppl)
    for cfg in configs:
        mode, greedy = cfg["mode"], cfg["greedy"]
        name = config_name(cfg)
        if cfg["rotation"] not in variants:
            t0 = time.perf_counter()
            m, online = rotate(model, cfg["rotation"], ids[half:])
            d = collect_statistics(m, ids[half:], seq_len=512, samples=a.samples,
                                   keep_windows=a.greedy_windows if cfg["allocation"] != "uniform" else 0,
                                   criteria=criteria)
            with torch.no_grad():
                own = perplexity(m, eval_ids, ctx=512, max_chunks=a.chunks).ppl
            variants[cfg["rotation"]] = (m, d, online, own)
            print(f"rotation {'+'.join(cfg['rotation'])}: {time.perf_counter() - t0:.0f} s, dense ppl {own:.3f}, "
                  f"online weights {online}", flush=True)
        cur, cdata, online, own = variants[cfg["rotation"]]
        # an online rotation reads weights too: calibrate so that the *net* sparsity is the target
        shift = online / decoder_w
        levels = [round(s + shift, 4) for s in sparsities]
        t0 = time.perf_counter()
        th = calibrate_from_statistics(cur, cdata, levels, mode, greedy_step=a.greedy_step,
                                       greedy_tokens=a.greedy_tokens, criterion=cfg["criterion"],
                                       sequential=cfg["sequential"], sequential_windows=a.sequential_windows,
                                       greedy_upstream=cfg["upstream"], allocation=cfg["allocation"],
                                       global_windows=a.global_windows, global_tokens=a.global_tokens,
                                       global_method=a.global_method, global_refine=cfg["refine"],
                                       global_match=cfg["match"])
        calib[name] = {"seconds": time.perf_counter() - t0}
        if cfg["rotation"]:
            calib[name]["rotation"] = {"dense_ppl": own, "online_weights": online}
        if cfg["match"]:
            calib[name]["match"] = th.calibration["global"]["match"]
        if cfg["allocation"] == "global":
            calib[name]["predicted"] = th.greedy["predicted_cost"]
        if cfg["allocation"] != "uniform":
            calib[name]["allocation"] = {
                f"{s:.4f}": {inp: statistics.mean(v for n, v in th.sparsity_of_inputs(lv).items() if n.endswith(inp))
                             for inp in ("attn_in", "o_in", "mlp_in", "down_in")} for s, lv in zip(sparsities, levels)}
        if greedy:
            err = th.greedy["error"]
            calib[name]["error_ratio"] = {k: statistics.mean(g / u for g, u in zip(v["greedy"], v["uniform"]) if u > 0)
                                          for k, v in err.items()}
            calib[name]["uniform_kept"] = th.greedy["uniform_kept"]
        print(f"{name}: calibrated in {calib[name]['seconds']:.0f} s", flush=True)
        for s, lv in zip(sparsities, levels):
            with torch.no_grad(), sparsify_activations(cur, th.rule(lv)) as counts:
                ppl = perplexity(cur, eval_ids, ctx=512, max_chunks=a.chunks).ppl
            rep = sparsity_report(counts, cur)
            rows.append({"config": name, "mode": mode, "criterion": cfg["criterion"],
                         "allocation": cfg["allocation"]
                         + (", sparse upstream" if greedy and cfg["upstream"] == "sparse" else ""),
                         "calibration": "sequential" if cfg["sequential"] else "dense", "target": s,
                         "weighted": rep["weighted"], "entries": rep["entries"], "ppl": ppl, "delta": ppl / base - 1,
                         "net": rep["weighted"] - online / decoder_w})
            print(f"  target {s:.2f}: weighted {rep['weighted']:.3f} (net {rows[-1]['net']:.3f}), "
                  f"entries {rep['entries']:.3f}, "
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
    targets = sorted({x["target"] for x in rows})
    names = list(dict.fromkeys(x.get("config", f"{x['mode']} magnitude {x['allocation']}") for x in rows))
    lines = [f"# Activation sparsity quality, embedded model ({date})", "",
             f"Device: {a.device_label}. SmolLM2-135M-Instruct (embedded GGUF; fp32 activations, fp16-stored "
             "projection weights, the CPU default). Every projection "
             "input is sparsified: attn_in (read by q, k and v), o_in, mlp_in (read by gate and up), down_in; "
             "the LM head stays dense. Calibration: one dense pass over "
             f"{a.samples} windows of 512 tokens from the second half of WikiText-2 valid ({r['collect_s']:.0f} s), "
             f"shared by all rows; greedy allocation on the layer inputs of the first {a.greedy_windows} of those "
             f"windows, error on {a.greedy_tokens} of their tokens, step {a.greedy_step}; global allocation's "
             f"sensitivity curves ({a.global_method}) on the first {a.global_tokens} tokens of the first {a.global_windows} window(s); "
             "sequential calibration "
             f"on {a.sequential_windows or a.samples} of the windows. Perplexity: the first "
             f"{a.chunks} chunks of 512 tokens of the first half (held out). Whole run: {r['total_s'] / 60:.0f} min.",
             "",
             "Command: `nice -n 19 python3 benchmarks/activation_quality.py --chunks "
             f"{a.chunks} --sparsities {a.sparsities} --date {date} --out {a.out or 'docs/results/activation-sparsity.md'}`"
             + ("" if a.configs == ",".join(CONFIGS) else f" with `--configs {a.configs}`"), "",
             "Configurations: *mode* (threshold, topk, adaptive); *criterion*: `magnitude` ranks entries by |x|, "
             "`weighted` by |x_i| times the norm of the weight column that reads channel i (WINA-style); "
             "*allocation*: uniform, greedy per layer (TEAL-style; *sparse upstream*: searched on inputs with "
             "the earlier layers sparsified), or global across layers from output-KL sensitivity curves "
             "(*refined*: curves re-estimated at the allocation's operating point; *matched*: nominal average "
             "moved until the sparsity measured on calibration windows is the target); *sequential*: each input's threshold taken from activations already "
             "sparsified upstream instead of dense ones.", "",
             "Sparsity columns are measured on the evaluation text: *weighted* = zeroed fraction of each input "
             "weighted by the weights it gates (q+k+v, o, gate+up, down), i.e. the fraction of decoder "
             "projection weight reads skipped (the true average over all projections); *entries* = zeroed "
             "entries over all input entries.", "",
             f"Dense perplexity: **{base:.3f}**."
             + "".join(f" Rotated ({n.split('rotated ')[-1]}), dense: {c['rotation']['dense_ppl']:.3f}."
                       for n, c in r["calibration"].items() if "rotation" in c), "",
             "Rotations (`rotated ...`): the sparsified inputs are rotated by orthogonal matrices (pca basis, 8 "
             "calibration windows; rarefy/sparsity/activation_rotation.py). `vo` (per key/value head) and `res` "
             "(residual stream) are folded into the weights: no run-time cost. `layer` rotates each layer's "
             "attention and MLP input at run time, a d x d matmul each (`layerN`: block-diagonal, d x N); *net* "
             "is the sparsity minus those rotation weights read per token, over the decoder projection weights.",
             "",
             "## Side by side: perplexity vs dense (true weighted sparsity)", "",
             "| configuration | " + " | ".join(f"{t:.2f}" for t in targets) + " |",
             "| --- |" + " --- |" * len(targets)]
    for n in names:
        cells = []
        for t in targets:
            x = next((x for x in rows if x.get("config", n) == n and abs(x["target"] - t) < 1e-9), None)
            net = "" if x is None or abs(x.get("net", x["weighted"]) - x["weighted"]) < 1e-12 else \
                f", net {x['net']:.3f}"
            cells.append("-" if x is None else f"{x['delta']:+.1%} ({x['weighted']:.3f}{net})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## All rows", "",
              "| configuration | thresholds from | target | weighted sparsity | net of online rotations "
              "| entries sparsity | perplexity | vs dense |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        lines.append(f"| {x.get('config', x['mode'] + ' ' + x['allocation'])} | "
                     f"{'sparse upstream' if x.get('calibration') == 'sequential' else 'dense pass'} | "
                     f"{x['target']:.2f} | {x['weighted']:.3f} | {x.get('net', x['weighted']):.3f} | "
                     f"{x['entries']:.3f} | {x['ppl']:.3f} | {x['delta']:+.1%} |")
    lines += ["", "## Against the issue's targets (non-uniform allocation, best mode)", "",
              "| target sparsity | allowed | best greedy or global row | weighted sparsity | vs dense | met? | best row of any "
              "allocation |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s_, allowed in TARGETS.items():
        at = [x for x in rows if abs(x["target"] - s_) < 1e-9]
        cands = [x for x in at if x["allocation"] != "uniform"]
        if not cands:
            continue
        best = min(cands, key=lambda x: x["ppl"])
        any_best = min(at, key=lambda x: x["ppl"])
        net = "" if abs(best.get("net", best["weighted"]) - best["weighted"]) < 1e-12 else f" (net {best['net']:.3f})"
        lines.append(f"| {s_:.2f} | +{allowed:.0%} | {best.get('config', best['mode'])} | {best['weighted']:.3f}{net} | "
                     f"{best['delta']:+.1%} | {'met' if best['delta'] <= allowed else 'missed'} | "
                     f"{any_best.get('config', any_best['mode'])}: {any_best['delta']:+.1%} "
                     f"({any_best['weighted']:.3f}) |")
    lines += ["", "## Calibration", "",
              "| configuration | calibration time | greedy/uniform layer error (mean ratio per level) | "
              "layers kept uniform per level |", "| --- | --- | --- | --- |"]
    for name, c in r["calibration"].items():
        ratio = ", ".join(f"{float(k):.2f}: {v:.2f}" for k, v in c.get("error_ratio", {}).items()) or "-"
        kept = ", ".join(f"{float(k):.2f}: {v}" for k, v in c.get("uniform_kept", {}).items()) or "-"
        if "predicted" in c:
            ratio = "predicted KL global/uniform: " + ", ".join(
                f"{float(k):.2f}: {v['global'] / v['uniform']:.2f}" for k, v in c["predicted"].items() if v["uniform"])
        lines.append(f"| {name} | {c['seconds']:.0f} s | {ratio} | {kept} |")
    alloc_rows = [(n, c["allocation"]) for n, c in r["calibration"].items() if "allocation" in c]
    if alloc_rows:
        lines += ["", "Greedy / global allocation, mean input sparsity over the 30 layers:", "",
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
