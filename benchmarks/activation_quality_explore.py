"""Scratch comparison of activation-sparsity ideas on the embedded model, one configuration per
run (the script behind the "third session" rows of docs/results/activation-sparsity.md).

    nice -n 19 python3 benchmarks/activation_quality_explore.py [--rot vo|layer|vo+residual|...]
        [--basis pca|svd] [--rblock N] [--criterion magnitude|weighted] [--bias W] [--fdiag W]
        [--refine R] [--levels 0.4,0.5] [--chunks 8] [--tag NAME]

Same protocol as benchmarks/activation_quality.py: statistics from 16 windows of 512 tokens of
the second half of WikiText-2 valid, global allocation (fisher curves on the first window),
perplexity on the first 8 chunks of 512 tokens of the first half (held out); one thread.
Options: ``--rot`` rotations (rarefy.sparsity.activation_rotation; pca basis from 8 calibration
windows, seed 7), ``--bias W`` a constant correction of every sparsified input, the mean of its
dropped part on W calibration windows (x ⊙ m + E[x ⊙ (1 - m)], i.e. a bias W E[...] on the
projection output), ``--fdiag W`` a Fisher-diagonal criterion (|x_i| · sqrt(E[g_i²]), g the
gradient of the sampled-label log-likelihood at the input, W windows, 4 label samples each),
``--refine R`` R rounds of rarefy.sparsity.activation_refine.refine_measured, ``--lowrank R`` a
rank-R compensation of every sparsified input's dropped part d = x - x_s (R-Sparse-like, Zhang et
al., ICLR 2025): the projections see x_s + A d with A = S^1/2 V_r V_r^T S^-1/2, V_r the top R right
singular vectors of W S^1/2 (W the stacked projections of that input, S = E[d d^T] on
``--lr-windows`` calibration windows at that level), i.e. the best rank-R map of d through W; run
time it costs R (d_in + d_out) weights per input, reported as "lowrank reads". Prints the
perplexity and the sparsity reached; writes JSON-DIR/TAG.json.
"""
# ruff: noqa: B023, I001, SIM115  (a scratch script: closures run within their loop iteration)
import argparse
import json
import os
import sys
import time

import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rarefy.eval.perplexity import perplexity
from rarefy.models.loader import load_model
from rarefy.sparsity.activation import (calibrate_from_statistics, collect_statistics, input_sites,
                                        sparsify_activations, sparsity_report)
from rarefy.sparsity.activation_rotation import rotate_model

ap = argparse.ArgumentParser()
ap.add_argument("--rot", default="")
ap.add_argument("--basis", default="pca")
ap.add_argument("--criterion", default="magnitude")
ap.add_argument("--alloc", default="global")
ap.add_argument("--levels", default="0.4,0.5")
ap.add_argument("--chunks", type=int, default=8)
ap.add_argument("--bias", type=int, default=0, help="windows for the mean-dropped correction (0: off)")
ap.add_argument("--rot-windows", type=int, default=8)
ap.add_argument("--tag", default="")
ap.add_argument("--json-dir", default="/tmp")
ap.add_argument("--refine", type=int, default=0)
ap.add_argument("--match", type=int, default=0, help="--global-match rounds")
ap.add_argument("--rblock", type=int, default=0)
ap.add_argument("--fdiag", type=int, default=0, help="windows for Fisher-diagonal channel scales (criterion)")
ap.add_argument("--ffloor", type=float, default=1e-3)
ap.add_argument("--lowrank", type=int, default=0, help="rank of the dropped-part compensation per input (0: off)")
ap.add_argument("--lr-windows", type=int, default=8)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--mode", default="threshold", help="threshold, topk or adaptive")
ap.add_argument("--dense-first", type=int, default=0,
                help="positions at the start of each window left dense (a prompt's first tokens: prefill is dense)")
ap.add_argument("--gwin", type=int, default=1, help="calibration windows the global allocation's curves run on")
ap.add_argument("--gsamples", type=int, default=4, help="label samples per window for the fisher curves")
ap.add_argument("--block", type=int, default=5)
ap.add_argument("--ref-windows", type=int, default=2)
ap.add_argument("--ref-tokens", type=int, default=512)
ap.add_argument("--ref-step", type=float, default=0.05)
a = ap.parse_args()
torch.set_num_threads(a.threads)
t0 = time.time()
loaded = load_model(None, dtype="fp16w")
model = loaded.model
VALID = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")
ids = loaded.tokenizer.encode(open(VALID, encoding="utf-8").read(), add_special_tokens=False)
half = len(ids) // 2
calib, ev = ids[half:], ids[:half]
levels = [float(s) for s in a.levels.split(",")]
if a.rot:
    g = torch.Generator().manual_seed(7)
    starts = torch.randint(0, len(calib) - 512, (a.rot_windows,), generator=g).tolist()
    info = rotate_model(model, a.rot.split("+"), [calib[s:s + 512] for s in starts], a.basis, a.rblock or None)
    print("rotated", info, f"{time.time()-t0:.0f}s", flush=True)
with torch.no_grad():
    dense = perplexity(model, ev, ctx=512, max_chunks=a.chunks).ppl
print(f"dense {dense:.3f} (ref 19.505) {time.time()-t0:.0f}s", flush=True)
if a.fdiag:
    import rarefy.sparsity.activation as act
    from rarefy.sparsity.activation_global import _differentiable, _tail
    fd = {}
    sites0 = act.input_sites(model)
    d0 = collect_statistics(model, calib, seq_len=512, samples=a.fdiag, keep_windows=a.fdiag, criteria=("magnitude",))
    gen = torch.Generator().manual_seed(13)
    for w in range(a.fdiag):
        h0 = d0.layer_inputs[0][w]; rope = d0.rope[w]
        with torch.no_grad():
            probs = torch.softmax(model.lm_head(model.model.norm(_tail(act.decoder_layers(model), 0, h0, rope))).float(), -1)
        for _ in range(4):
            labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(probs.shape[:-1])
            seen = {}
            def keep(mod, args, name=None):
                x = args[0]; x.retain_grad(); seen[name] = x
            hs = [st.hook.register_forward_pre_hook(lambda m, ar, name=n: keep(m, ar, name)) for n, st in sites0.items()]
            with torch.enable_grad(), _differentiable():
                h = h0.clone().requires_grad_(True)
                lp = torch.log_softmax(model.lm_head(model.model.norm(_tail(act.decoder_layers(model), 0, h, rope))).float(), -1)
                lp.gather(-1, labels.unsqueeze(-1)).sum().backward()
            for hh in hs: hh.remove()
            for n, x in seen.items():
                g2 = x.grad.detach().double().pow(2).reshape(-1, x.shape[-1]).sum(0)
                fd[n] = fd.get(n, 0) + g2
    fscales = {}
    for n, v in fd.items():
        c = v.sqrt().float()
        fscales[n] = c.clamp_min(float(c.max()) * a.ffloor).clamp_min(1e-30)
    orig = act.input_scales
    act.input_scales = lambda model, criterion: fscales if criterion == "weighted" else orig(model, criterion)
    a.criterion = "weighted"
    print(f"fisher diag scales {time.time()-t0:.0f}s", flush=True)
data = collect_statistics(model, calib, seq_len=512, samples=16, keep_windows=max(2, a.gwin), criteria=(a.criterion,))
th = calibrate_from_statistics(model, data, levels, a.mode, criterion=a.criterion, allocation=a.alloc,
                               global_windows=a.gwin, global_tokens=512, global_match=a.match,
                               global_samples=a.gsamples)
print(f"calibrated {time.time()-t0:.0f}s", flush=True)
sites = input_sites(model)
res = []
from rarefy.sparsity.activation import LevelRule, input_weights
from rarefy.sparsity.activation_refine import refine_measured
rules = {}
for s in levels:
    rules[s] = th.rule(s)
    if a.refine:
        t1 = time.time()
        stats = data.stats_for(a.criterion)
        sc = data.scales.get(a.criterion)
        new, log = refine_measured(model, data, "threshold", stats, sc, th.sparsity_of_inputs(s), input_weights(model),
                                   rounds=a.refine, block=a.block, step=a.ref_step, windows=a.ref_windows,
                                   tokens=a.ref_tokens, progress=True)
        rules[s] = LevelRule("threshold", {n: stats[n].param("threshold", v) for n, v in new.items()}, a.criterion)
        print(f"refined {s} in {time.time()-t1:.0f}s", flush=True)

def dropped_stats(sites, rule, windows, stat):
    """{input: [sum over tokens of stat(dropped part d = x - x_s, float64 [tokens, width]), tokens]}
    with every input sparsified by ``rule``, over ``windows`` (token id lists)."""
    acc = {n: [0, 0] for n in sites}
    seen = {}
    hs = []
    with torch.no_grad(), sparsify_activations(model, rule):
        for n, st in sites.items():
            hs.append(st.hook.register_forward_pre_hook(
                lambda mod, args, n=n: seen.__setitem__(n, args[0]), prepend=True))

            def fold(mod, args, n=n):
                dd = (seen.pop(n) - args[0]).reshape(-1, args[0].shape[-1]).double()
                acc[n][0] = acc[n][0] + stat(dd)
                acc[n][1] += dd.shape[0]
            hs.append(st.hook.register_forward_pre_hook(fold))
        for w in windows:
            model(torch.tensor([w]))
        for h in hs:
            h.remove()
    return acc


for s in levels:
    d = None
    if a.bias:
        acc = dropped_stats(sites, rules[s], data.windows[:a.bias], lambda dd: dd.sum(0))
        d = {n: (v[0] / v[1]).float() for n, v in acc.items()}
    A = None
    if a.lowrank:
        g = torch.Generator().manual_seed(11)
        starts = torch.randint(0, len(calib) - 512, (a.lr_windows,), generator=g).tolist()
        acc = dropped_stats(sites, rules[s], [calib[st0:st0 + 512] for st0 in starts], lambda dd: dd.t() @ dd)
        A, lr_reads = {}, 0
        for n, st in sites.items():
            S = acc[n][0] / max(1, acc[n][1])
            ev_, U_ = torch.linalg.eigh(S)
            ev_ = ev_.clamp_min(float(ev_.max()) * 1e-6)
            Sh = (U_ * ev_.sqrt()) @ U_.t()
            Shi = (U_ * ev_.rsqrt()) @ U_.t()
            W = torch.cat([p.weight.detach().double() for p in st.projections], 0)
            _, _, Vt = torch.linalg.svd(W @ Sh, full_matrices=False)
            Vr = Vt[:a.lowrank].t()
            A[n] = ((Sh @ Vr) @ (Vr.t() @ Shi)).float()
            lr_reads += a.lowrank * (W.shape[1] + W.shape[0])
        total_w = sum(input_weights(model).values())
        print(f"lowrank {a.lowrank}: reads {lr_reads / total_w:.3%} of the gated weights  {time.time()-t0:.0f}s",
              flush=True)
    hs = []
    with torch.no_grad(), sparsify_activations(model, rules[s]) as counts:
        if a.dense_first:
            first = {}

            def save_first(mod, args, n=None):
                first[n] = args[0][:, :a.dense_first].clone()

            def restore_first(mod, args, n=None):
                x = args[0].clone()
                k = first[n].shape[1]
                # the restored entries were counted as dropped: take them back out of the count
                counts[n][0] -= int(((x[:, :k] == 0) & (first[n] != 0)).sum())
                x[:, :k] = first[n]
                return (x,) + tuple(args[1:])
            for n, st in sites.items():
                hs.append(st.hook.register_forward_pre_hook(lambda mod, args, n=n: save_first(mod, args, n),
                                                            prepend=True))
                hs.append(st.hook.register_forward_pre_hook(lambda mod, args, n=n: restore_first(mod, args, n)))
        if A is not None:
            keep_x = {}
            for n, st in sites.items():
                hs.append(st.hook.register_forward_pre_hook(
                    lambda mod, args, n=n: keep_x.__setitem__(n, args[0]), prepend=True))
                hs.append(st.hook.register_forward_pre_hook(
                    lambda mod, args, n=n: (args[0] + ((keep_x[n] - args[0]).float() @ A[n].t()).to(args[0].dtype),)
                    + tuple(args[1:])))
        if d is not None:
            for n, st in sites.items():
                hs.append(st.hook.register_forward_pre_hook(
                    lambda mod, args, v=d[n]: (args[0] + v.to(args[0].dtype),) + tuple(args[1:])))
        ppl = perplexity(model, ev, ctx=512, max_chunks=a.chunks).ppl
        for h in hs: h.remove()
    rep = sparsity_report(counts, model)
    r = {"level": s, "weighted": rep["weighted"], "ppl": ppl, "vs_ref": ppl / 19.505 - 1, "vs_own": ppl / dense - 1}
    if A is not None:
        r["lowrank_reads"] = lr_reads / sum(input_weights(model).values())
        r["net"] = rep["weighted"] - r["lowrank_reads"]
    res.append(r)
    print(f"{a.tag} level {s}: weighted {rep['weighted']:.3f} net {r.get('net', rep['weighted']):.3f} ppl {ppl:.3f} vs 19.505 {ppl/19.505-1:+.1%} "
          f"vs own dense {ppl/dense-1:+.1%}  {time.time()-t0:.0f}s", flush=True)
json.dump({"args": vars(a), "dense": dense, "rows": res}, open(os.path.join(a.json_dir, f"{a.tag or 'run'}.json"), "w"))
