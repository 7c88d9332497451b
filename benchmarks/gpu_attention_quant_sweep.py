"""Sweep how the int8 / fp8 paged decode kernel is launched at 32k x 1 and 4k x 32 (H100):
conversion path, int8 q.K MMA, tile, split count (programs per SM), register cap, stages.
Every variant is checked against rarefy's torch path before it is timed (CUDA-graph replay
over cache copies larger than L2), and bf16's default plan is timed in the same run.

    PYTHONPATH=. python3 benchmarks/gpu_attention_quant_sweep.py [--points 32k:1,4k:32] [--dtypes int8,fp8_e4m3]

Found the defaults of rarefy/kernels/paged_attention/plan.py for quantized caches
(docs/results/attention.md, "Quantized caches").
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def variants(kvd: str, base_splits: int, pairs: int, sms: int) -> dict:
    out = {"default": {}}
    splits = sorted({base_splits // 2, (3 * base_splits) // 4, base_splits, -(-2 * sms // pairs),
                     -(-3 * sms // pairs), -(-4 * sms // pairs)} - {0})
    for t, ns in itertools.product((64, 128), splits):
        kw = dict(tile_n=t, num_splits=ns)
        out[f"t{t} s{ns}"] = kw
        if kvd == "int8":
            out[f"t{t} s{ns} qk8"] = dict(kw, qk_int8=True)
    out[f"t128 s{base_splits} r128"] = dict(tile_n=128, num_splits=base_splits, max_regs=128)
    out[f"t128 s{base_splits} fused"] = dict(tile_n=128, num_splits=base_splits, fused_reduce=True)
    out[f"t128 s{base_splits} w8"] = dict(tile_n=128, num_splits=base_splits, num_warps=8)
    out[f"t128 s{base_splits} dot bf16"] = dict(tile_n=128, num_splits=base_splits, dot_dtype="bf16", convert="plain")
    for st in (3, 7):
        out[f"t128 s{base_splits} st{st}"] = dict(tile_n=128, num_splits=base_splits, num_stages=st)
    for st in (3, 5):  # 256-token tiles: more bytes per chain of dependent steps
        out[f"t256 s{base_splits} st{st}"] = dict(tile_n=256, num_splits=base_splits, num_stages=st)
        out[f"t256 s{base_splits // 2} st{st}"] = dict(tile_n=256, num_splits=base_splits // 2, num_stages=st)
    return out


def main(argv=None) -> int:
    import torch

    from rarefy.bench.attention import AttnBenchConfig, _Case, _rel_err, _Runner
    from rarefy.kernels.paged_attention.plan import plan_decode
    from rarefy.kernels.paged_attention.torch_decode import paged_decode_attention_torch
    from rarefy.kernels.paged_attention.triton_decode import paged_decode_attention_triton, sm_count_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="32k:1,4k:32")
    ap.add_argument("--dtypes", default="int8,fp8_e4m3")
    a = ap.parse_args(argv)
    cfg = AttnBenchConfig(device="cuda", samples=5)
    run = _Runner(cfg, None)
    dev = run.device
    sms = sm_count_of(dev)
    rows = []
    for pt in a.points.split(","):
        c, b = pt.split(":")
        ctx = int(c[:-1]) * 1024 if c.endswith("k") else int(c)
        batch = int(b)
        for kvd in ["bf16"] + a.dtypes.split(","):
            base = plan_decode(batch, ctx, 32, 8, 128, kvd, 16, sms)
            case = None
            try:
                from rarefy.bench.attention import kv_bytes
                nb = kv_bytes(kvd, batch, ctx, 8, 32, 128, 16, 2)
                case = _Case(cfg, ctx, batch, kvd, run.nbuf_for(nb["kv"] + nb["scales"]), dev)
                ref = paged_decode_attention_torch(*case.args(0), case.sm_scale).float()
                vs = {"default": {}} if kvd == "bf16" else variants(kvd, base.num_splits, batch * 8, sms)
                for label, kw in vs.items():
                    r = dict(kvd=kvd, ctx=ctx, batch=batch, label=label, us=None, err=None, plan="", note="")
                    try:
                        plan = plan_decode(batch, ctx, 32, 8, 128, kvd, 16, sms, **kw)
                        r["plan"] = plan.describe()
                        y = paged_decode_attention_triton(*case.args(0), case.sm_scale, plan=plan)
                        r["err"] = _rel_err(y, ref)
                        if not r["err"] < 2e-2:
                            r["note"] = "FAILED check"
                        else:
                            r["us"], _ = run.time_us(lambda i, p=plan: paged_decode_attention_triton(
                                *case.args(i), case.sm_scale, plan=p), case.nbuf)
                    except Exception as e:  # noqa: BLE001
                        r["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                        torch.cuda.synchronize(dev)
                    rows.append(r)
                    print(f"{kvd:8s} {ctx//1024}k x{batch:<3d} {label:22s} "
                          f"{(f'{r[chr(117)+chr(115)]:.1f}' if r['us'] else '-'):>7s} µs  err {r['err'] or 0:.1e} "
                          f"{r['note']}", file=sys.stderr, flush=True)
            finally:
                case = None
                run.free()
    print("\nkv        point     variant                    µs   vs bf16  rel err  plan")
    for pt in {(r["ctx"], r["batch"]) for r in rows}:
        bf = next((r["us"] for r in rows if (r["ctx"], r["batch"]) == pt and r["kvd"] == "bf16" and r["us"]), None)
        best = {}
        for r in rows:
            if (r["ctx"], r["batch"]) == pt and r["us"] and (r["kvd"] not in best or r["us"] < best[r["kvd"]]["us"]):
                best[r["kvd"]] = r
        for r in [x for x in rows if (x["ctx"], x["batch"]) == pt and x["label"] == "default"] + list(best.values()):
            ratio = f"{bf / r['us']:.2f}x" if bf and r["us"] else "-"
            print(f"{r['kvd']:8s}  {r['ctx']//1024}k x{r['batch']:<3d} {r['label']:22s} "
                  f"{r['us'] or 0:7.1f}  {ratio:>7s}  {r['err'] or 0:.1e}  {r['plan']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
