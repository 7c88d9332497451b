"""Ternary GEMV at batch 1 on the H100: the dp4a kernel (int8 activations on the integer
dot-product unit) against cuBLAS bf16, rarefy's float ternary kernel and its earlier int8-
activation path, in one run.

    PYTHONPATH=. python3 benchmarks/gpu_ternary_dp4a.py [--sweep]

Llama-3-8B shapes, random weights quantized to ternary (per-tensor absmean scale). Every
kernel is checked against a float64 reference first; CUDA-graph replay over weight copies
larger than 4x L2 (rarefy.bench.gpu_timing). "+ quant" rows add the per-token activation
quantization launch that a float input needs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from rarefy.bench.gpu_timing import graph_time_us, l2_bytes, n_buffers
    from rarefy.kernels.lowbit_gemv import ref as R
    from rarefy.kernels.lowbit_gemv import ternary_matmul, ternary_matmul_int8act
    from rarefy.kernels.lowbit_gemv.triton_ternary_dp4a import (Dp4aConfig, pick_dp4a_config, quantize_act_dp4a,
                                                               ternary_dp4a_triton)
    from rarefy.lowbit.ternary import pack_ternary, quantize_ternary_values

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--api", action="store_true",
                    help="time the public calls on the decode engine's fused shapes (qkv, o, gate_up, down) instead")
    a = ap.parse_args(argv)
    if a.api:
        return api_times()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    l2 = l2_bytes(dev)
    table, ratios = [], {}
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        g = torch.Generator().manual_seed(n + k)
        q, s = quantize_ternary_values(torch.randn(n, k, generator=g))
        packed = pack_ternary(q).to(dev)
        s = s.to(dev)
        wd = (q.float() * s.cpu()).to(torch.bfloat16).to(dev)
        nbuf = n_buffers(n * k * 2, l2)
        dense = [wd.clone() for _ in range(nbuf)]
        nbuf_t = n_buffers(packed.numel(), l2)
        packs = [packed.clone() for _ in range(nbuf_t)]
        x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(dev)
        xq, xs = quantize_act_dp4a(x)
        rq, rs = R.quantize_act_int8_ref(x.float().cpu())
        ref8 = ((rq.double() @ q.double().t()) * s.double().cpu() * rs.double().reshape(-1, 1)).to(dev)
        reff = (x.double() @ wd.double().t())

        def err(y, ref):
            return float((y.double() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("inf")

        res = {"cuBLAS bf16": graph_time_us(lambda i: F.linear(x, dense[i % nbuf]), nbuf, dev, samples=5)}
        assert err(ternary_matmul(x, packed, s), reff) < 1e-2
        res["ternary fma (bf16 x)"] = graph_time_us(lambda i: ternary_matmul(x, packs[i], s), nbuf_t, dev, samples=5)
        assert err(ternary_matmul_int8act(x, packed, s), ref8) < 1e-2  # bf16 output
        res["ternary i8act (old, + quant)"] = graph_time_us(lambda i: ternary_matmul_int8act(x, packs[i], s),
                                                            nbuf_t, dev, samples=5)
        cfgs = {"default": pick_dp4a_config(1, n, k, sms)}
        if a.sweep:
            for bn, sk, pf, pdl in itertools.product((4, 8, 16), (1, 2, 4, 8), (False, True), (False, True)):
                cfgs[f"n{bn} s{sk}{' pf' if pf else ''}{' pdl' if pdl else ''}"] = Dp4aConfig(bn, 128, sk, 4, pf, pdl)
        best = None
        for label, cfg in cfgs.items():
            e = err(ternary_dp4a_triton(xq, xs, packed, s, config=cfg), ref8)
            if not e < 1e-5:
                print(f"{name} dp4a {label}: FAILED rel err {e:.2e}", flush=True)
                continue
            t = graph_time_us(lambda i, c=cfg: ternary_dp4a_triton(xq, xs, packs[i], s, config=c), nbuf_t, dev, samples=5)
            res[f"dp4a {label} [{cfg.short()}]"] = t
            if best is None or t < best[0]:
                best = (t, label, cfg)
        bcfg = best[2]
        res["dp4a best + quant"] = graph_time_us(
            lambda i: ternary_dp4a_triton(*quantize_act_dp4a(x), packs[i], s, config=bcfg), nbuf_t, dev, samples=5)
        base = res["cuBLAS bf16"]
        for lab, t in res.items():
            if lab.startswith("dp4a n"):
                continue
            table.append((name, lab, t, base / t, packed.numel() / t / 1e6))
            ratios.setdefault(lab.split(" [")[0], []).append(base / t)
        if a.sweep:
            table.append((name, f"dp4a best: {best[1]}", best[0], base / best[0], packed.numel() / best[0] / 1e6))
            ratios.setdefault("dp4a best", []).append(base / best[0])
        print(name, ", ".join(f"{lab} {t:.1f}" for lab, t in res.items()), flush=True)
    print("\n| shape | kernel | µs | vs cuBLAS | TB/s (packed weights) |\n| --- | --- | --- | --- | --- |")
    for name, lab, t, r, tbs in table:
        print(f"| {name} | {lab} | {t:.1f} | {r:.2f}x | {tbs:.2f} |")
    print("\n| kernel | median vs cuBLAS over the shapes |\n| --- | --- |")
    for lab, v in ratios.items():
        print(f"| {lab} | {statistics.median(v):.2f}x |")
    return 0


def api_times() -> int:
    """Public API per decode-step call (what the engine runs, stacked q/k/v and gate/up):
    ternary_matmul (bf16 x) against ternary_matmul_int8act (quantize + dp4a), and the
    quantization launch alone."""
    import torch

    from rarefy.bench.gpu_timing import graph_time_us, l2_bytes, n_buffers
    from rarefy.kernels.lowbit_gemv import ternary_matmul, ternary_matmul_int8act
    from rarefy.kernels.lowbit_gemv.triton_ternary_dp4a import quantize_act_dp4a
    from rarefy.lowbit.ternary import pack_ternary, quantize_ternary_values

    dev = torch.device("cuda")
    l2 = l2_bytes(dev)
    print("\n| call | N x K | ternary_matmul µs | ternary_matmul_int8act µs | quantize alone µs |\n| --- | --- | --- | --- | --- |")
    for name, (n, k) in {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}.items():
        q, s = quantize_ternary_values(torch.randn(n, k))
        packed = pack_ternary(q).to(dev)
        s = s.to(dev)
        nb = n_buffers(packed.numel(), l2)
        packs = [packed.clone() for _ in range(nb)]
        x = torch.randn(1, k, device=dev).to(torch.bfloat16)
        tf = graph_time_us(lambda i: ternary_matmul(x, packs[i], s), nb, dev, samples=5)
        ta = graph_time_us(lambda i: ternary_matmul_int8act(x, packs[i], s), nb, dev, samples=5)
        tq = graph_time_us(lambda i: quantize_act_dp4a(x), 1, dev, samples=5)
        print(f"| {name} | {n}x{k} | {tf:.1f} | {ta:.1f} | {tq:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
