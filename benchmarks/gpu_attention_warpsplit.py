"""The warp-split decode kernel (one online softmax per warp, V token- or dim-major) against
rarefy's default decode kernel, in one run on a GPU: 32k x 1 for every KV dtype, then the
batch points. Every variant is checked against the torch path before it is timed (CUDA-graph
replay over cache copies larger than L2).

    PYTHONPATH=. python3 benchmarks/gpu_attention_warpsplit.py [--points 32k:1,4k:32] [--dtypes bf16,int8,...]
        [--variants "t128 w4 st5 dm,..."] [--json FILE]

Variant labels: t<tokens per tile> w<warps = sub-streams> st<num_stages> dm|tm (V dim- or
token-major), sw (accepted, no effect: every variant runs the swap kernel), r<register cap>, s<splits>, fr (fused
split reduction), pf<pages> (the first pages of each split asked of L2 before the PDL wait; "base pf4" for the
default kernel), bt (int8 through the bit trick with its subtraction), bk / bb / bu (int8 through the x + 1152 conversion for K / K and V / K and V from
offset-binary bytes, the benchmark flipping the cache's sign bits first), nopdl (no programmatic dependent launch of the decode kernel and the reduction; "base nopdl" is the default kernel so), cp (Triton's own int8/fp8 conversion); "base" is the default kernel and plan. docs/results/attention.md ("Warp split").
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_VARIANTS = ("t64 w2 st5 dm", "t64 w2 st5 dm cp", "t64 w2 st3 dm", "t64 w2 st7 dm", "t128 w2 st5 dm",
                    "t64 w4 st5 dm", "t32 w1 st5 dm", "t64 w2 st5 dm s48", "t64 w2 st5 dm nopdl", "t64 w2 st5 tm")


def parse_variant(label: str) -> dict:
    out = {}
    for part in label.split():
        if part in ("dm", "tm"):
            out["dm"] = part == "dm"
        elif part == "sw":
            out["swap"] = True
        elif part == "base":
            pass
        elif part == "nopdl":
            out["pdl"] = False
        elif part == "fr":
            out["fused_reduce"] = True
        elif part.startswith("pf"):
            out["prefetch_pages"] = int(part[2:])
        elif part == "cp":
            out["convert"] = "plain"
        elif part in ("bt", "bk", "bb", "bu"):
            out["convert"] = {"bt": "bits", "bk": "bias_k", "bb": "bias", "bu": "bias_u8"}[part]
        elif part.startswith("r"):
            out["max_regs"] = int(part[1:])
        elif part.startswith("st"):
            out["num_stages"] = int(part[2:])
        elif part.startswith("t"):
            out["tile_n"] = int(part[1:])
        elif part.startswith("w"):
            out["num_warps"] = int(part[1:])
        elif part.startswith("s"):
            out["num_splits"] = int(part[1:])
    return out


def main(argv=None) -> int:
    import torch

    from rarefy.bench.attention import (AttnBenchConfig, _Case, _Runner, check_then_time, failure_note, kv_bytes,
                                        parse_points)
    from rarefy.bench.attention_report import ab_finish, ab_progress
    from rarefy.kernels.paged_attention.plan import plan_decode
    from rarefy.kernels.paged_attention.torch_decode import paged_decode_attention_torch
    from rarefy.kernels.paged_attention.triton_decode import (
        paged_decode_attention_triton, sm_count_of, v_is_dim_major)
    from rarefy.kernels.paged_attention.triton_decode_warpsplit import paged_decode_attention_warpsplit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="32k:1")
    ap.add_argument("--dtypes", default="bf16,int8,fp8_e4m3,fp8_e5m2")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cfg = AttnBenchConfig(device="cuda", samples=a.samples)
    run = _Runner(cfg, None)
    dev = run.device
    sms = sm_count_of(dev)
    rows = []
    for ctx, batch in parse_points(a.points):
        for kvd in a.dtypes.split(","):
            nb = kv_bytes(kvd, batch, ctx, 8, 32, 128, 16, 2)
            case = _Case(cfg, ctx, batch, kvd, run.nbuf_for(nb["kv"] + nb["scales"]), dev)
            try:
                ref = paged_decode_attention_torch(*case.args(0), case.sm_scale).float()
                # V both ways: a view of dim-major storage (the paged cache's layout for 8-bit
                # caches) and token-major (the default kernel's "base" row reads it)
                v_dm = case.v_cache if v_is_dim_major(case.v_cache) else \
                    case.v_cache.transpose(2, 3).contiguous().transpose(2, 3)
                v_tm = case.v_cache.contiguous()
                for label in ["base", "base nopdl"] + [v for v in a.variants.split(",") if v]:
                    r = dict(kvd=kvd, ctx=ctx, batch=batch, label=label, us=None, err=None, plan="", note="")
                    try:
                        if label.startswith("base"):
                            pf = parse_variant(label).get("prefetch_pages", 0)
                            plan = plan_decode(batch, ctx, 32, 8, 128, kvd, 16, sms, kernel="base", prefetch_pages=pf)

                            def launch(i, p=plan, pdl=parse_variant(label).get("pdl")):
                                q, kc, _, ks, vs, bt, sl, kv = case.args(i)
                                return paged_decode_attention_triton(q, kc, v_tm, ks, vs, bt, sl, kv, case.sm_scale,
                                                                     plan=p, pdl=pdl)
                        else:
                            kw = parse_variant(label)
                            dm = kw.pop("dm", True)
                            kw.pop("swap", None)  # "sw": every variant is the swap kernel now
                            pdl = kw.pop("pdl", None)
                            plan = plan_decode(batch, ctx, 32, 8, 128, kvd, 16, sms, kernel="swap", **kw)

                            kc_use, v_use = case.k_cache, (v_dm if dm else v_tm)
                            if plan.convert == "bias_u8":  # offset-binary bytes: x + 128, the sign bit flipped
                                kc_use = (case.k_cache.view(torch.uint8) ^ 0x80).view(torch.int8)
                                v_use = (v_use.view(torch.uint8) ^ 0x80).view(torch.int8)

                            def launch(i, p=plan, dm=dm, pdl=pdl, kc_use=kc_use, v_use=v_use):
                                q, kc, vc, ks, vs, bt, sl, kv = case.args(i)
                                return paged_decode_attention_warpsplit(
                                    q, kc_use, v_use, ks, vs, bt, sl, kv, case.sm_scale, plan=p,
                                    v_dim_major=dm, pdl=pdl)
                        r["plan"] = plan.describe()
                        check_then_time(run, r, launch, ref, case.nbuf)
                    except Exception as e:  # noqa: BLE001
                        r["note"] = failure_note(e, dev)
                    rows.append(r)
                    print(ab_progress(r, "label"), file=sys.stderr, flush=True)
            finally:
                case = None
                v_dm = v_tm = None
                run.free()
    ab_finish(rows, "label", "base", torch.cuda.get_device_name(dev), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
