"""Plan variants for `rarefy bench attention --sweep` / `--sweep-quant`: one
change at a time from the default plan (splits, tile, stages, warps, dot or FMA, reduction),
the combinations earlier sweeps pointed to, and for 8-bit caches how the tiles reach the
tensor cores. The runner in rarefy/bench/attention.py checks each variant against the
default's output before timing it, and formats the table."""

from __future__ import annotations

import math


def sweep_variants(base, kv_dtype: str, batch: int, num_kv_heads: int, sms: int, generic: bool = True) -> dict:
    """{label: plan_decode keyword overrides} around ``base`` (the default plan); ``generic``
    False keeps only the stage and 8-bit conversion variants (``--sweep-quant``)."""
    s = base.num_splits
    variants = {"default": {}}
    quant = kv_dtype in ("int8", "fp8_e4m3", "fp8_e5m2")
    pairs = max(1, batch * num_kv_heads)
    for ns in [] if not generic else sorted({1, max(1, s // 2), 2 * s, 4 * s, math.ceil(sms / pairs), math.ceil(2 * sms / pairs),
                      math.ceil(3 * sms / pairs)} - {s}):
        variants[f"splits={ns}"] = dict(num_splits=ns)
    for t in (32, 64, 128) if generic else ():
        if t != base.tile_n:
            variants[f"tile_n={t}"] = dict(tile_n=t)
    for st in (3, 5, 7):
        if st != base.num_stages:
            variants[f"stages={st}"] = dict(num_stages=st)
    for w in (4, 8) if generic else ():
        if w != base.num_warps:
            variants[f"warps={w}"] = dict(num_warps=w)
    if generic:
        variants["fma" if base.use_dot else "dot"] = dict(use_dot=not base.use_dot)
        variants["no prefetch" if base.prefetch_pages else "prefetch 4"] = dict(prefetch_pages=0 if base.prefetch_pages else 4)
    if s > 1 and generic:
        variants["two kernels" if base.fused_reduce else "fused reduce"] = dict(fused_reduce=not base.fused_reduce)
    if s > 1 and generic:  # combinations the one-at-a-time rows pointed to (H100, 2026-11-23)
        for t in (64, 128):
            for mult in (1, 2):
                for w in (4, 8):
                    variants[f"2k t{t} s{mult * s} w{w}"] = dict(fused_reduce=False, tile_n=t,
                                                                num_splits=mult * s, num_warps=w)
    if quant:  # how the tiles reach the tensor cores
        variants["dot bf16 plain"] = dict(dot_dtype="bf16", convert="plain")
        variants["dot fp16 plain"] = dict(dot_dtype="fp16", convert="plain")
        if kv_dtype != "fp8_e5m2":
            variants["dot fp16 bits"] = dict(dot_dtype="fp16", convert="bits")
        if kv_dtype == "int8":
            variants["qk int8"] = dict(qk_int8=True)
            variants["qk int8 w8"] = dict(qk_int8=True, num_warps=8)
            variants["qk int8 t128"] = dict(qk_int8=True, tile_n=128)
        for w in (4, 8):
            for t in (64, 128):
                for mult in (1, 2):
                    variants[f"w{w} t{t} s{mult * s}"] = dict(num_warps=w, tile_n=t, num_splits=mult * s)
    return variants
