"""CPU differential weight cache benchmark: cache update vs index_select rebuild, and the sparse
MLP through the cache vs the dense MLP (torch fp32 F.linear, rarefy fp16 gemv_f16).

Shapes (one SwiGLU MLP per decoder layer, batch 1, 2 threads):
  smollm2  H=576,  I=1536, 30 layers: the embedded model's MLPs (fp16: 159 MB in all, about the
           size of this CPU's 260 MB L3, so partly cache-resident as in real decode here)
  llama3b  H=3072, I=8192, 4 layers (Llama-3.2-3B-like; fp16 151 MB per layer, so each call
           reads its weights from DRAM as real decode of a 28-layer model would)
Each token runs every layer once, in order, so a layer's data was last touched L calls ago.

Mask sequences (one per layer, consecutive tokens overlapping):
  synthetic (rho): persistence model. Each neuron has a popularity p_i = exp(z_i), z ~ N(0, 1).
      Token 0 draws k_0 neurons with probability proportional to p, without replacement. Token
      t+1 has k_{t+1} = round(k (1 + U(-0.05, 0.05))) active neurons (k = (1 - sparsity) I); it
      keeps min(round(rho k_t), k_{t+1}) of token t's neurons (drawn ~ p) and adds the rest from
      the inactive ones (~ p). So the overlap |m_t & m_{t+1}| / k_t is about rho and about
      (1 - rho) k neurons change per token.
  real (smollm2 only): the embedded model on WikiText-2 valid text, per token and layer the
      top-k neurons by |silu(gate x) * (up x)| (the oracle that a Deja Vu-style predictor
      approximates). Its consecutive-token overlap is reported; it is far below 70-90%.
Cache capacity: max_active_fraction = 1.05 (1 - sparsity) + 1/I (room for the count jitter).

Variants (per call, timed with perf_counter; medians over all calls of all repeats):
  cache       DifferentialWeightCache.update(mask), then .mlp(x) (fp16 pool, gate/up interleaved)
  cache-sep   the same with separate gate and up pools (layout comparison)
  index_sel   idx = mask.nonzero(); index_select rows of gate, up, down^T (new tensors), then
              the same fused sparse MLP kernel on them
  index_out   the same into preallocated buffers (index_select(out=)): a stronger baseline
  dense fp32  F.linear(gate), F.linear(up), silu * mul, F.linear(down), fp32 weights
  dense fp16  rarefy's CPU decode path: gemv_f16 on fp16 gate, up, down (+ silu * mul)
Variants run one after another within a repeat; repeats interleave them, so load drift hits all.

    python3 benchmarks/cpu_weight_cache.py --out docs/results/weight-cache-cpu.md
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench.machine import cpu_name  # noqa: E402
from rarefy.kernels import gemv_cpu, weight_cache_cpu  # noqa: E402
from rarefy.kernels.weight_cache_cpu import sparse_mlp, sparse_mlp_ref  # noqa: E402
from rarefy.sparsity.weight_cache import DifferentialWeightCache, index_select_rows  # noqa: E402

SHAPES = {  # name: (H, I, layers, description)
    "smollm2": (576, 1536, 30, "SmolLM2-135M MLP (embedded model), 30 layers"),
    "llama3b": (3072, 8192, 4, "Llama-3.2-3B-like MLP, 4 layers streamed from DRAM"),
}
VALID = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext-2",
                     "valid.txt")


# ----------------------------------------------------------------------------- masks
def synthetic_masks(i: int, sparsity: float, rho: float, tokens: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Persistence-model mask sequence (see the module docstring)."""
    k = max(1, round((1 - sparsity) * i))
    p = torch.randn(i, generator=gen).exp()

    def count():
        return max(1, min(i, round(k * (1 + (torch.rand(1, generator=gen).item() - 0.5) * 0.1))))

    def draw(pool_idx, num):
        if num <= 0:
            return pool_idx[:0]
        return pool_idx[torch.multinomial(p[pool_idx], num, replacement=False, generator=gen)]

    m = torch.zeros(i, dtype=torch.bool)
    m[draw(torch.arange(i), count())] = True
    out = [m]
    for _ in range(tokens - 1):
        kt, k1 = int(m.sum()), count()
        keep = min(round(rho * kt), k1)
        on, off = m.nonzero().squeeze(1), (~m).nonzero().squeeze(1)
        nm = torch.zeros(i, dtype=torch.bool)
        nm[draw(on, keep)] = True
        nm[draw(off, min(k1 - keep, off.numel()))] = True
        out.append(nm)
        m = nm
    return out


def real_activations(tokens: int) -> torch.Tensor:
    """|down_proj input| of the embedded model, [layers, tokens, I], on WikiText-2 valid text."""
    from rarefy.models.loader import load_model

    lm = load_model(None, gguf_blocks=False)
    model, tok = lm.model, lm.tokenizer
    with open(VALID, encoding="utf-8") as f:
        text = f.read()[:200_000]
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    caps = []
    layers = model.model.layers if hasattr(model, "model") else model.layers
    hooks = [l.mlp.down_proj.register_forward_hook(
        lambda mod, inp, out: caps.append(inp[0].detach().float().reshape(-1, inp[0].shape[-1]).abs()))
        for l in layers]
    with torch.inference_mode():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return torch.stack(caps)


def topk_masks(act: torch.Tensor, sparsity: float) -> list[list[torch.Tensor]]:
    """Per layer, per token: top-(1 - sparsity) I neurons by |activation|."""
    L, T, I = act.shape
    k = max(1, round((1 - sparsity) * I))
    m = torch.zeros(L, T, I, dtype=torch.bool).scatter_(-1, act.topk(k, dim=-1).indices, True)
    return [[m[l, t].clone() for t in range(T)] for l in range(L)]


def overlap_stats(seqs: list[list[torch.Tensor]]) -> tuple[float, float]:
    """Mean |m_t & m_{t+1}| / |m_t| and mean changed neurons per token (added + removed) / 2."""
    ov, ch = [], []
    for s in seqs:
        for a, b in zip(s, s[1:]):
            ov.append((a & b).sum().item() / max(1, a.sum().item()))
            ch.append((a ^ b).sum().item() / 2)
    return statistics.mean(ov), statistics.mean(ch)


# ----------------------------------------------------------------------------- layers
class Layer:
    """One MLP's weights in every form the variants need."""

    def __init__(self, h, i, gen):
        self.gate = torch.randn(i, h, generator=gen) / math.sqrt(h)
        self.up = torch.randn(i, h, generator=gen) / math.sqrt(h)
        self.down = torch.randn(h, i, generator=gen) / math.sqrt(i)
        self.g16, self.u16 = self.gate.half(), self.up.half()
        self.d16 = self.down.half()                        # [H, I] for gemv_f16
        self.dt16 = self.down.t().half().contiguous()      # [I, H] rows of down^T
        self.x = torch.randn(h, generator=gen)


def wait_for_low_load(max_load: float, max_wait: float) -> float:
    t0 = time.time()
    while os.getloadavg()[0] >= max_load and time.time() - t0 < max_wait:
        time.sleep(10)
    return os.getloadavg()[0]


def dense_fp32(ly):
    return F.linear(F.silu(F.linear(ly.x, ly.gate)) * F.linear(ly.x, ly.up), ly.down)


def dense_fp16(ly):
    return gemv_cpu.gemv_f16(F.silu(gemv_cpu.gemv_f16(ly.x, ly.g16)) * gemv_cpu.gemv_f16(ly.x, ly.u16), ly.d16)


def run_group(layers, mask_sets, frac, repeats, dense_tokens, check=True):
    """Times every variant; returns {variant: {part: [seconds per call]}} per mask set + dense."""
    pc = time.perf_counter
    L = len(layers)
    caches = {name: [DifferentialWeightCache(ly.g16, ly.u16, ly.dt16, frac, down_transposed=True, interleave=il)
                     for ly in layers] for name, il in (("cache", True), ("cache-sep", False))}
    cap = caches["cache"][0].capacity
    h = layers[0].x.numel()
    bufs = [(torch.empty(cap, h, dtype=torch.float16), torch.empty(cap, h, dtype=torch.float16),
             torch.empty(cap, h, dtype=torch.float16)) for _ in layers]
    res = {ms: {v: {"upd": [], "mlp": []} for v in ("cache", "cache-sep", "index_sel", "index_out")}
           for ms in mask_sets}
    res["dense"] = {"fp32": [], "fp16": []}

    def cache_pass(name, masks, rec):
        cs = caches[name]
        for l in range(L):                      # prime with token 0 (not timed)
            cs[l].reset()
            cs[l].update(masks[l][0])
        for t in range(1, len(masks[0])):
            for l in range(L):
                c, ly = cs[l], layers[l]
                t0 = pc()
                c.update(masks[l][t])
                t1 = pc()
                c.mlp(ly.x)
                t2 = pc()
                if rec is not None:
                    rec["upd"].append(t1 - t0)
                    rec["mlp"].append(t2 - t1)

    def index_pass(masks, rec, out):
        for t in range(1, len(masks[0])):
            for l in range(L):
                ly, m = layers[l], masks[l][t]
                t0 = pc()
                if out:
                    bg, bu, bd = bufs[l]
                    idx = m.nonzero().squeeze(1)
                    n = idx.numel()
                    g = torch.index_select(ly.g16, 0, idx, out=bg[:n])
                    u = torch.index_select(ly.u16, 0, idx, out=bu[:n])
                    d = torch.index_select(ly.dt16, 0, idx, out=bd[:n])
                else:
                    _, g, u, d = index_select_rows(ly.g16, ly.u16, ly.dt16, m)
                t1 = pc()
                sparse_mlp(ly.x, g, u, d)
                t2 = pc()
                if rec is not None:
                    rec["upd"].append(t1 - t0)
                    rec["mlp"].append(t2 - t1)

    def dense_pass(fn, rec):
        for _ in range(dense_tokens):
            for ly in layers:
                t0 = pc()
                fn(ly)
                if rec is not None:
                    rec.append(pc() - t0)

    if check:  # the variants compute the same thing
        ms0 = next(iter(mask_sets.values()))
        ly, m = layers[0], ms0[0][1]
        c = caches["cache"][0]
        c.reset()
        c.update(m)
        ref = sparse_mlp_ref(ly.x, ly.g16, ly.u16, ly.d16, m)
        for y in (c.mlp(ly.x), sparse_mlp(ly.x, *index_select_rows(ly.g16, ly.u16, ly.dt16, m)[1:])):
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-4, "sparse MLP mismatch"
        full = sparse_mlp_ref(ly.x, ly.g16, ly.u16, ly.d16)
        for y in (dense_fp32(ly), dense_fp16(ly)):
            assert ((y.double() - full).norm() / full.norm()).item() < 1e-2, "dense MLP mismatch"

    with torch.inference_mode():
        # warm-up: one untimed pass of everything
        for masks in mask_sets.values():
            cache_pass("cache", masks, None)
            cache_pass("cache-sep", masks, None)
            index_pass(masks, None, False)
            index_pass(masks, None, True)
        dense_pass(dense_fp32, None)
        dense_pass(dense_fp16, None)
        for _ in range(repeats):
            for ms, masks in mask_sets.items():
                cache_pass("cache", masks, res[ms]["cache"])
                index_pass(masks, res[ms]["index_sel"], False)
                cache_pass("cache-sep", masks, res[ms]["cache-sep"])
                index_pass(masks, res[ms]["index_out"], True)
            dense_pass(dense_fp32, res["dense"]["fp32"])
            dense_pass(dense_fp16, res["dense"]["fp16"])
    return res, cap


def med(v):
    return statistics.median(v) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--overlap", type=float, nargs="+", default=[0.7, 0.8, 0.9], help="synthetic rho values")
    ap.add_argument("--tokens", type=int, nargs=2, default=[64, 12],
                    help="tokens per mask sequence for smollm2 and llama3b")
    ap.add_argument("--no-real", action="store_true", help="skip the embedded model's real masks")
    ap.add_argument("--real-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-min load average to drop below")
    ap.add_argument("--max-wait", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    for mod, name in [(gemv_cpu, "gemv_f16"), (weight_cache_cpu, "weight cache")]:
        if not mod.warm_up():
            sys.exit(f"{name} extension unavailable: {mod._state['error']}")
    isa = weight_cache_cpu.ISA_NAMES[weight_cache_cpu.best_isa()]
    dev = f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"device: {dev}; sparse MLP path: {isa}; load {os.getloadavg()[0]:.2f}", flush=True)

    real = None
    if "smollm2" in a.shapes and not a.no_real:
        t0 = time.time()
        real = real_activations(a.real_tokens)
        print(f"real activations {tuple(real.shape)} in {time.time() - t0:.0f} s", flush=True)

    upd_rows, mlp_rows, tot_rows, lay_rows, loads = [], [], [], [], []
    for shape in a.shapes:
        h, i, nl, desc = SHAPES[shape]
        gen = torch.Generator().manual_seed(h + i)
        t0 = time.time()
        layers = [Layer(h, i, gen) for _ in range(nl)]
        print(f"\n{shape}: {desc} ({time.time() - t0:.0f} s to build)", flush=True)
        tokens = a.tokens[0] if shape == "smollm2" else a.tokens[1]
        for s in a.sparsity:
            mask_sets = {}
            for rho in a.overlap:
                mask_sets[f"synthetic rho={rho:g}"] = [synthetic_masks(i, s, rho, tokens, gen) for _ in range(nl)]
            if shape == "smollm2" and real is not None:
                mask_sets["real (embedded model)"] = topk_masks(real, s)
            frac = min(1.0, 1.05 * (1 - s) + 1 / i)
            load0 = wait_for_low_load(a.max_load, a.max_wait)
            res, cap = run_group(layers, mask_sets, frac, a.repeats, dense_tokens=min(tokens, 8))
            load1 = os.getloadavg()[0]
            loads.append(f"{shape} {s:.0%}: {load0:.2f} -> {load1:.2f}")
            t32, t16 = med(res["dense"]["fp32"]), med(res["dense"]["fp16"])
            for ms, masks in mask_sets.items():
                ov, ch = overlap_stats(masks)
                r = res[ms]
                cu, cm = med(r["cache"]["upd"]), med(r["cache"]["mlp"])
                iu, im = med(r["index_sel"]["upd"]), med(r["index_sel"]["mlp"])
                ou, om = med(r["index_out"]["upd"]), med(r["index_out"]["mlp"])
                su, sm = med(r["cache-sep"]["upd"]), med(r["cache-sep"]["mlp"])
                ctot = med([x + y for x, y in zip(r["cache"]["upd"], r["cache"]["mlp"])])
                itot = med([x + y for x, y in zip(r["index_sel"]["upd"], r["index_sel"]["mlp"])])
                otot = med([x + y for x, y in zip(r["index_out"]["upd"], r["index_out"]["mlp"])])
                key = f"| {shape} | {s:.0%} | {ms} | {ov:.2f} |"
                upd_rows.append(f"{key} {ch:.0f} | {cu:.1f} | {iu:.1f} | {ou:.1f} | **{iu / cu:.2f}x** | {ou / cu:.2f}x |")
                mlp_rows.append(f"{key} {cm:.1f} | {t32:.1f} | {t16:.1f} | **{t32 / cm:.2f}x** | **{t16 / cm:.2f}x** |"
                                f" {ctot:.1f} | {t32 / ctot:.2f}x | {t16 / ctot:.2f}x |")
                tot_rows.append(f"{key} {ctot:.1f} | {itot:.1f} | {otot:.1f} | **{itot / ctot:.2f}x** |"
                                f" {otot / ctot:.2f}x |")
                lay_rows.append(f"{key} {cm:.1f} | {sm:.1f} | {cu:.1f} | {su:.1f} |")
                print(upd_rows[-1], "\n", mlp_rows[-1], "\n", tot_rows[-1], "\n", lay_rows[-1], flush=True)
            print(f"  capacity {cap} of {i}; load {loads[-1]}", flush=True)
        del layers

    H = "| shape | sparsity | masks | overlap |"
    tables = [
        "## (a) Cache update vs index_select rebuild (per layer per token)", "",
        "`changed` = neurons added per token (= removed, on average). index_select: `mask.nonzero()` + 3 x"
        " `index_select` into new tensors; `out=`: into preallocated buffers.", "",
        H + " changed | cache update µs | index_select µs | index_select out= µs | vs index_select | vs out= |",
        "|" + "---|" * 10, *upd_rows, "",
        "## (b) Sparse MLP through the cache vs the dense MLP (per layer per token)", "",
        "`cache MLP` = the fused kernel on the pool only; `update+MLP` adds the update (what decode pays).", "",
        H + " cache MLP µs | dense fp32 µs | dense fp16 gemv µs | MLP vs fp32 | MLP vs fp16 | update+MLP µs |"
        " upd+MLP vs fp32 | upd+MLP vs fp16 |",
        "|" + "---|" * 12, *mlp_rows, "",
        "## (c) update + compute vs index_select + compute (same fused kernel)", "",
        H + " cache µs | index_select µs | index_select out= µs | vs index_select | vs out= |",
        "|" + "---|" * 9, *tot_rows, "",
        "## Pool layout: gate/up interleaved per slot vs separate pools", "",
        H + " MLP interleaved µs | MLP separate µs | update interleaved µs | update separate µs |",
        "|" + "---|" * 8, *lay_rows, "",
    ]
    print("\n".join(tables))
    print("loads:", "; ".join(loads))
    if a.out:
        cmd = "python3 benchmarks/cpu_weight_cache.py " + " ".join(sys.argv[1:])
        head = [
            "# CPU differential weight cache: update and sparse MLP vs index_select and dense", "",
            f"Date: {time.strftime('%Y-%m-%d')}  ",
            f"Device: {dev}  ",
            f"Kernel path: `{isa}` (rarefy/kernels/weight_cache_cpu)  ",
            f"Load average (1 min) per group, start -> end: {'; '.join(loads)}  ",
            f"Command: `{cmd}`", "",
            "Method: see the docstring of benchmarks/cpu_weight_cache.py (shapes, layers, mask models,"
            " variants). Median of per-call times over all calls of all repeats"
            f" ({a.repeats} repeats after one untimed warm-up pass). All caches fp16, capacity ="
            " ceil((1.05 (1 - sparsity) + 1/I) I).", "",
        ]
        with open(a.out, "w") as f:
            f.write("\n".join(head + tables))


if __name__ == "__main__":
    main()
