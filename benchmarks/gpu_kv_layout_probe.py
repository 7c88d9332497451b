"""Does the paged cache's memory layout limit 8-bit decode attention? One run on a GPU.

The 8-bit caches stream at ~2.76 TB/s marginal against bf16's ~3.06 (docs/results/attention.md,
seventh session). One difference: with 16-token blocks a K or V page of one head is 2 KiB in
8 bits and 4 KiB in bf16, and the blocks are scattered (shuffled block table), while the
per-token scales are a third, 32-byte access per page. This probe times rarefy's decode kernel
(the plan the dispatcher makes) on the same data in several layouts:

    sep        K, V, scales in separate tensors (rarefy's layout), shuffled blocks
    seq        the same, blocks in order (the locality ceiling)
    b32        separate tensors, 32-token blocks (4 KiB 8-bit pages)
    colo       K and V of one (block, head) side by side: one 2 x page run
    colo+s     K, V and their scales side by side in one byte buffer
    s0         rarefy's layout, but every page's scales one 32-byte run (block stride 0): what
               the scale loads' DRAM latency costs (checked against the torch path on the
               same broadcast scales)

Every layout is checked against the torch path (float32) before it is timed (CUDA-graph
replay over cache copies larger than 4x L2).

    PYTHONPATH=. python3 benchmarks/gpu_kv_layout_probe.py [--points 8k:1,32k:1,128k:1]
        [--dtypes bf16,int8,fp8_e4m3] [--layouts sep,seq,b32,colo,colo+s] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

HKV, HQ, D = 8, 32, 128


def _page_views(flat: torch.Tensor, nb: int, bs: int, sd: torch.dtype, with_scales: bool):
    """K [nb, HKV, bs, D], V dim-major view, scales [nb, HKV, bs] (or None) over one byte buffer
    whose (block, head) pages hold K, then V, then (optionally) the K and V scales."""
    isz = torch.empty((), dtype=sd).element_size()
    page = 2 * bs * D * isz + (4 * bs if with_scales else 0)
    page = -(-page // 16) * 16  # 16-byte aligned pages (vector loads)
    typed = flat.view(sd)
    pe = page // isz  # page stride in storage elements
    k = typed.as_strided((nb, HKV, bs, D), (HKV * pe, pe, D, 1), 0)
    v = typed.as_strided((nb, HKV, bs, D), (HKV * pe, pe, 1, bs), bs * D)  # dim-major: [.., D, bs] storage
    if not with_scales:
        return k, v, None, None, page
    h = flat.view(torch.float16)
    ph = page // 2
    off = 2 * bs * D * isz // 2
    ks = h.as_strided((nb, HKV, bs), (HKV * ph, ph, 1), off)
    vs = h.as_strided((nb, HKV, bs), (HKV * ph, ph, 1), off + bs)
    return k, v, ks, vs, page


class LayoutCase:
    def __init__(self, layout: str, kv_dtype: str, ctx: int, batch: int, nbuf: int, device, seed: int = 0):
        from rarefy.bench.attention import fill_random
        from rarefy.kv.quant import is_quantized, storage_dtype

        g = torch.Generator(device=device).manual_seed(seed + 7 * ctx + batch)
        bs = 32 if layout == "b32" else 16
        nblk = math.ceil(ctx / bs)
        per_copy = batch * nblk
        total = nbuf * per_copy
        sd = storage_dtype(kv_dtype)
        quant = is_quantized(kv_dtype)
        if layout in ("colo", "colo+s"):
            with_s = layout == "colo+s" and quant
            isz = torch.empty((), dtype=sd).element_size()
            page = -(-(2 * bs * D * isz + (4 * bs if with_s else 0)) // 16) * 16
            self.buf = torch.empty(total * HKV * page, dtype=torch.uint8, device=device)
            self.k_cache, self.v_cache, self.k_scale, self.v_scale, _ = _page_views(self.buf, total, bs, sd, with_s)
            if quant and not with_s:
                self.k_scale = torch.empty((total, HKV, bs), dtype=torch.float16, device=device)
                self.v_scale = torch.empty_like(self.k_scale)
        else:
            self.k_cache = torch.empty((total, HKV, bs, D), dtype=sd, device=device)
            self.v_cache = torch.empty((total, HKV, D, bs), dtype=sd, device=device).transpose(2, 3)
            self.k_scale = torch.empty((total, HKV, bs), dtype=torch.float16, device=device) if quant else None
            self.v_scale = torch.empty_like(self.k_scale) if quant else None
        for cache, scale in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale)):
            fill_random(cache, scale, kv_dtype, g)
        if layout == "s0" and quant:  # every block's scales: block 0's (always cached)
            self.k_scale = self.k_scale.as_strided(self.k_scale.shape, (0,) + self.k_scale.stride()[1:])
            self.v_scale = self.v_scale.as_strided(self.v_scale.shape, (0,) + self.v_scale.stride()[1:])
        perm = torch.arange(total, device=device, dtype=torch.int32) if layout == "seq" else \
            torch.randperm(total, generator=g, device=device).to(torch.int32)
        self.tables = [perm[i * per_copy:(i + 1) * per_copy].view(batch, nblk).contiguous() for i in range(nbuf)]
        self.qs = [torch.randn((batch, HQ, D), generator=g, device=device).to(torch.bfloat16) for _ in range(nbuf)]
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.kv_dtype, self.ctx, self.nbuf = kv_dtype, ctx, nbuf
        self.sm_scale = 1.0 / math.sqrt(D)

    def args(self, i: int):
        return (self.qs[i], self.k_cache, self.v_cache, self.k_scale, self.v_scale, self.tables[i], self.seq_lens,
                self.kv_dtype)


def main(argv=None) -> int:
    from rarefy.bench.attention import (AttnBenchConfig, _Runner, check_then_time, failure_note, kv_bytes,
                                        parse_points)
    from rarefy.bench.attention_report import ab_finish, ab_progress
    from rarefy.kernels.paged_attention.torch_decode import paged_decode_attention_torch
    from rarefy.kernels.paged_attention.triton_decode import make_plan, paged_decode_attention_triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", default="8k:1,32k:1,128k:1")
    ap.add_argument("--dtypes", default="bf16,int8,fp8_e4m3")
    ap.add_argument("--layouts", default="sep,seq,b32,colo,colo+s,s0")
    ap.add_argument("--plan", default="", help="plan overrides for every row, e.g. prefetch_pages=0")
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    run = _Runner(AttnBenchConfig(device="cuda", samples=a.samples), None)
    dev = run.device
    rows = []
    for ctx, batch in parse_points(a.points):
        for kvd in a.dtypes.split(","):
            for layout in a.layouts.split(","):
                nb = kv_bytes(kvd, batch, ctx, HKV, HQ, D, 16, 2)
                r = dict(kvd=kvd, ctx=ctx, batch=batch, layout=layout, us=None, err=None, plan="", note="",
                         mb=nb["total"] / 1e6)
                case = None
                try:
                    case = LayoutCase(layout, kvd, ctx, batch, run.nbuf_for(nb["kv"] + nb["scales"]), dev)
                    ref = paged_decode_attention_torch(*case.args(0), case.sm_scale).float()
                    kw = {k: int(v) for k, v in (p.split("=") for p in a.plan.split(",") if p)}
                    plan = make_plan(case.qs[0], case.k_cache, case.tables[0], kvd, max_seq_len=ctx, v_dim_major=True,
                                     **kw)
                    r["plan"] = plan.describe()

                    def launch(i, p=plan, case=case):
                        return paged_decode_attention_triton(*case.args(i), case.sm_scale, plan=p)

                    check_then_time(run, r, launch, ref, case.nbuf)
                except Exception as e:  # noqa: BLE001
                    r["note"] = failure_note(e, dev)
                finally:
                    case = None
                    run.free()
                rows.append(r)
                print(ab_progress(r, "layout"), file=sys.stderr, flush=True)
    ab_finish(rows, "layout", "sep", torch.cuda.get_device_name(dev), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
