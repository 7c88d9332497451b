"""`rarefy bench attention`: paged decode attention against the copy bandwidth and torch SDPA.

For each (context, batch) point and KV dtype: a paged cache (block size 16, blocks shuffled
so a sequence's pages are scattered as in a long-running server) holding random normal
keys/values quantized with rarefy.kv.quant, every sequence ``ctx`` tokens long, 32 query
heads over 8 KV heads, head_dim 128, a bf16 query per sequence; then

* rarefy     ``rarefy.kernels.paged_attention.paged_decode_attention`` (GPU: the Triton
             flash-decoding kernel launched as plan_decode says; CPU: the torch path)
* sdpa       ``torch.nn.functional.scaled_dot_product_attention`` on the same keys/values
             as contiguous ``[B, Hkv, L, D]`` bf16 (dequantized), query length 1,
             ``enable_gqa=True``: timed once per point, compared with every dtype.

Every rarefy row is first checked against the torch path on the same cache (relative error
of the output < ``tol``, no NaN); a row that fails is FAILED and not timed.

Timing (GPU): back-to-back launches replayed from a CUDA graph (rarefy.bench.gpu_timing),
rotating over copies of the cache (disjoint blocks of one cache tensor, one block table per
copy) that together exceed 4x L2 so L2 never serves a repeat; the median of ``samples``
replays. CPU: wall clock of back-to-back calls (rarefy.bench.cpu_timing.cpu_time_us).

Bytes are what the kernel must read and write: K + V as stored, their float16 scales
(quantized dtypes), the block tables, seq_lens, the query and the output. TB/s = bytes /
time; "% copy" compares it with the device-to-device copy bandwidth (read + write)
measured in the same run. ``--sweep`` also times one-at-a-time changes to the plan
(splits, tile, stages, warps, dot/FMA, fused/separate reduction) at the target points, for
tuning plan_decode.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from rarefy.bench.attention_sweep import sweep_variants
from rarefy.bench.machine import device_copy_bandwidth_tbs
from rarefy.errors import RarefyError

DTYPES = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8")
GPU_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
GPU_BATCHES = (1, 4, 8, 16, 32, 64)
#: --quick: the issue's targets (32k x 1, 4k x 32) and three more batch-1 contexts.
GPU_QUICK = ((32768, 1), (4096, 32), (1024, 1), (8192, 1), (131072, 1))
#: the points --sweep tunes at (with bf16, fp8_e4m3 and int8)
SWEEP_POINTS = ((32768, 1), (4096, 32))
SWEEP_DTYPES = ("bf16", "fp8_e4m3", "fp8_e5m2", "int8")
CPU_CONTEXTS = (256, 1024)
CPU_BATCHES = (1, 4)
CPU_QUICK = ((256, 1), (256, 2))
#: batch x context cap: 2M tokens is 8 GiB of bf16 K+V (one layer, 8 KV heads, D = 128),
#: and the SDPA copy as much again.
MAX_TOKENS = 1 << 21
TARGET_COPY_FRACTION = 0.8
TARGET_QUANT_SPEEDUP = 1.7


@dataclass
class AttnBenchConfig:
    device: str = "cuda"
    points: tuple = GPU_QUICK
    kv_dtypes: tuple = DTYPES
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    q_dtype: torch.dtype = torch.bfloat16
    samples: int = 7
    seed: int = 0
    sdpa: bool = True
    sweep: bool = False
    sweep_quant_only: bool = False      # sweep only how int8/fp8 tiles reach the tensor cores
    tol: float = 2e-2
    max_tokens: int = MAX_TOKENS
    copy_bytes: Optional[int] = None
    command: str = "rarefy bench attention"
    extra: dict = field(default_factory=dict)


def grid_points(contexts, batches, max_tokens: int = MAX_TOKENS) -> tuple:
    """(ctx, batch) for every pair whose batch x ctx fits max_tokens, context-major."""
    return tuple((c, b) for c in contexts for b in batches if b * c <= max_tokens)


def default_config(device: str, quick: bool = False, **kw) -> AttnBenchConfig:
    if device == "cuda":
        points = GPU_QUICK if quick else grid_points(GPU_CONTEXTS, GPU_BATCHES)
    else:
        points = CPU_QUICK if quick else grid_points(CPU_CONTEXTS, CPU_BATCHES)
        kw.setdefault("copy_bytes", 64 * 2**20)
        kw.setdefault("samples", 3 if quick else 5)
    return AttnBenchConfig(device=device, points=points, **kw)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        try:
            v = int(part) * mult
        except ValueError:
            raise RarefyError(f"{what}: {part!r} is not a number (e.g. 1024 or 32k)") from None
        if v < 1:
            raise RarefyError(f"{what}: values must be positive")
        out.append(v)
    if not out:
        raise RarefyError(f"{what}: give at least one value")
    return tuple(out)


def parse_points(text: str) -> list[tuple[int, int]]:
    """"32k:1,4k:32" -> [(32768, 1), (4096, 32)] (context:batch pairs)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        ctx, sep, batch = part.partition(":")
        if not sep:
            raise RarefyError(f"point {part!r}: give context:batch, e.g. 32k:1")
        out.append((parse_ints(ctx, "context")[0], parse_ints(batch, "batch")[0]))
    return out


def parse_dtypes(text: str) -> tuple[str, ...]:
    from rarefy.kv.quant import check_kv_dtype

    out = tuple(check_kv_dtype(t.strip()) for t in text.split(",") if t.strip())
    if not out:
        raise RarefyError("--kv-dtypes: give at least one dtype")
    return out


# ------------------------------------------------------------------------------------ data


def kv_bytes(kv_dtype: str, batch: int, ctx: int, hkv: int, hq: int, d: int, block_size: int,
             q_bytes: int = 2) -> dict:
    """The bytes a decode call moves, by kind."""
    from rarefy.kv.quant import is_quantized, storage_dtype

    tokens = batch * ctx
    kv = 2 * tokens * hkv * d * storage_dtype(kv_dtype).itemsize
    scales = 2 * tokens * hkv * 2 if is_quantized(kv_dtype) else 0
    tables = batch * math.ceil(ctx / block_size) * 4 + batch * 4
    qo = 2 * batch * hq * d * q_bytes
    return dict(kv=kv, scales=scales, tables=tables, q_out=qo, total=kv + scales + tables + qo)


def fill_random(cache: torch.Tensor, scale, kv_dtype: str, g: torch.Generator) -> None:
    """Fill a ``[blocks, heads, block_size, head_dim]`` cache view (and its scales, quantized
    dtypes) with quantized standard normal values, a bounded chunk of blocks at a time."""
    from rarefy.kv.quant import quantize

    total, hkv, bs, d = cache.shape
    step = max(1, (1 << 24) // (hkv * bs * d))  # blocks per chunk (bounded float32 temporaries)
    for a in range(0, total, step):
        x = torch.randn((min(step, total - a), hkv, bs, d), generator=g, device=cache.device)
        qx, sx = quantize(x, kv_dtype)
        cache[a:a + qx.shape[0]] = qx
        if scale is not None:
            scale[a:a + qx.shape[0]] = sx


class _Case:
    """nbuf copies of a paged cache in one tensor (disjoint, shuffled blocks), one block table
    and one query per copy."""

    def __init__(self, cfg: AttnBenchConfig, ctx: int, batch: int, kv_dtype: str, nbuf: int, device):
        from rarefy.kv.paged import stores_v_dim_major
        from rarefy.kv.quant import is_quantized, storage_dtype

        g = torch.Generator(device=device).manual_seed(cfg.seed + 7 * ctx + batch)
        bs, hkv, d = cfg.block_size, cfg.num_kv_heads, cfg.head_dim
        nblk = math.ceil(ctx / bs)
        per_copy = batch * nblk
        total = nbuf * per_copy
        sd = storage_dtype(kv_dtype)
        quant = is_quantized(kv_dtype)
        self.k_cache = torch.empty((total, hkv, bs, d), dtype=sd, device=device)
        # V as rarefy's paged cache stores it (stores_v_dim_major; docs/kv-cache.md)
        self.v_cache = torch.empty((total, hkv, d, bs), dtype=sd, device=device).transpose(2, 3) \
            if stores_v_dim_major(kv_dtype, device) else torch.empty_like(self.k_cache)
        self.k_scale = torch.empty((total, hkv, bs), dtype=torch.float16, device=device) if quant else None
        self.v_scale = torch.empty_like(self.k_scale) if quant else None
        for cache, scale in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale)):
            fill_random(cache, scale, kv_dtype, g)
        perm = torch.randperm(total, generator=g, device=device).to(torch.int32)
        self.tables = [perm[i * per_copy:(i + 1) * per_copy].view(batch, nblk).contiguous() for i in range(nbuf)]
        self.qs = [torch.randn((batch, cfg.num_heads, d), generator=g, device=device).to(cfg.q_dtype)
                   for _ in range(nbuf)]
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.kv_dtype, self.ctx, self.batch, self.nbuf = kv_dtype, ctx, batch, nbuf
        self.sm_scale = 1.0 / math.sqrt(d)

    def args(self, i: int):
        return (self.qs[i], self.k_cache, self.v_cache, self.k_scale, self.v_scale, self.tables[i], self.seq_lens,
                self.kv_dtype)

    def dense(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy i's keys/values as contiguous [B, Hkv, L, D] bf16 (dequantized)."""
        from rarefy.kernels.paged_attention.torch_decode import _gather

        out = []
        for cache, scale in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale)):
            parts = [_gather(cache, scale, self.tables[i][b:b + 1].long(), self.ctx).to(torch.bfloat16)
                     for b in range(self.batch)]
            out.append(torch.cat(parts).contiguous())
        return out[0], out[1]


# ------------------------------------------------------------------------------------ timing


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not bool(torch.isfinite(y).all()):
        return math.inf
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_then_time(run: "_Runner", r: dict, launch, ref: torch.Tensor, nbuf: int, tol: float = 2e-2) -> None:
    """For the probe scripts: r["err"] of launch(0) against ``ref``; then r["us"] (timed over
    ``nbuf`` operand copies) when within ``tol``, else r["note"] = "FAILED check"."""
    r["err"] = _rel_err(launch(0), ref)
    if not r["err"] < tol:
        r["note"] = "FAILED check"
    else:
        r["us"], _ = run.time_us(launch, nbuf)


def failure_note(e: Exception, device) -> str:
    """A probe row's note for an exception (the device synchronised first, so the next row starts clean)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


class _Runner:
    def __init__(self, cfg: AttnBenchConfig, progress):
        self.cfg = cfg
        self.device = torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
        self.cuda = self.device.type == "cuda"
        self.progress = progress or (lambda row: None)
        self.rows: list[dict] = []
        self.sweep_rows: list[dict] = []
        self.notes: dict[str, str] = {}
        self.copy_tbs: Optional[float] = None
        if self.cuda:
            from rarefy.bench.gpu_timing import l2_bytes

            self.target_bytes = 4 * l2_bytes(self.device)
        else:
            self.target_bytes = 0  # CPU: no rotation (the torch path's gathers dwarf any cache effect)

    def nbuf_for(self, nbytes: int) -> int:
        if nbytes >= self.target_bytes:
            return 1
        return min(64, math.ceil(self.target_bytes / max(1, nbytes)))

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def time_us(self, launch, nbuf: int) -> tuple[float, str]:
        if not self.cuda:
            from rarefy.bench.cpu_timing import cpu_time_us

            return cpu_time_us(launch, nbuf, self.cfg.samples, 0.01), "wall clock"
        from rarefy.bench.gpu_timing import do_bench_us, graph_time_us

        try:
            return graph_time_us(launch, nbuf, self.device, samples=self.cfg.samples), "cuda graph"
        except Exception as e:  # noqa: BLE001
            torch.cuda.synchronize(self.device)
            how = f"do_bench (graph capture failed: {type(e).__name__})"
        return do_bench_us(launch, nbuf, clean_l2=True, warmup=10, rep=50), how

    # -- one point
    def run_point(self, ctx: int, batch: int):
        cfg = self.cfg
        sdpa_us = None
        sdpa_note = ""
        for kv_dtype in cfg.kv_dtypes:
            nb = kv_bytes(kv_dtype, batch, ctx, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, cfg.block_size,
                          cfg.q_dtype.itemsize)
            nbuf = self.nbuf_for(nb["kv"] + nb["scales"])
            t0 = time.perf_counter()
            row = dict(kv_dtype=kv_dtype, ctx=ctx, batch=batch, status="ok", check=None, rel_err=None, us=None,
                       timing=None, nbuf=nbuf, bytes=nb["total"], bytes_by_kind=nb, mb=nb["total"] / 1e6,
                       tbs=None, frac_copy=None, sdpa_us=None, sdpa_ratio=None, vs_bf16=None, plan=None,
                       plan_str="torch" if not self.cuda else None, smem_actual=None, regs=None, spills=None,
                       note="", seconds=None)
            try:
                case = _Case(cfg, ctx, batch, kv_dtype, nbuf, self.device)
                self._measure(case, row)
                if cfg.sdpa and sdpa_us is None and not sdpa_note:
                    sdpa_us, sdpa_note = self._sdpa(case, row)
                if cfg.sweep and (ctx, batch) in SWEEP_POINTS and kv_dtype in SWEEP_DTYPES and row["us"]:
                    self._sweep(case, row)
            except torch.cuda.OutOfMemoryError as e:
                row.update(status="skipped", note=f"out of memory: {str(e).splitlines()[0][:120]}")
            except Exception as e:  # noqa: BLE001
                row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            finally:
                case = None
                self.free()
            row["sdpa_us"] = sdpa_us
            if sdpa_note and not row["note"]:
                row["note"] = sdpa_note
            row["seconds"] = time.perf_counter() - t0
            self.rows.append(row)
        # ratios once the point is done (bf16 is the reference for vs_bf16)
        pts = [r for r in self.rows if r["ctx"] == ctx and r["batch"] == batch]
        bf = next((r["us"] for r in pts if r["kv_dtype"] == "bf16" and r["us"]), None)
        for r in pts:
            if r["us"]:
                r["sdpa_ratio"] = sdpa_us / r["us"] if sdpa_us else None
                r["vs_bf16"] = bf / r["us"] if bf else None
            self.progress(r)

    def _measure(self, case: _Case, row: dict):
        from rarefy.kernels.paged_attention import paged_decode_attention
        from rarefy.kernels.paged_attention.torch_decode import paged_decode_attention_torch

        cfg = self.cfg
        ref = paged_decode_attention_torch(*case.args(0), case.sm_scale).float()
        if self.cuda:
            from rarefy.kernels.paged_attention.triton_decode import (
                make_plan, paged_decode_attention_triton, v_is_dim_major)

            # the plan the dispatcher makes for this cache (dim-major V: the swap kernel)
            plan = make_plan(case.qs[0], case.k_cache, case.tables[0], case.kv_dtype, max_seq_len=case.ctx,
                             v_dim_major=v_is_dim_major(case.v_cache))
            row["plan"] = asdict(plan)
            row["plan_str"] = plan.describe()
            y, kernel = paged_decode_attention_triton(*case.args(0), case.sm_scale, plan=plan, return_kernel=True)
            meta = getattr(kernel, "metadata", None)
            row["smem_actual"] = getattr(meta, "shared", None)
            row["regs"] = getattr(kernel, "n_regs", None)
            row["spills"] = getattr(kernel, "n_spills", None)
        else:
            y = paged_decode_attention(*case.args(0), case.sm_scale)
        err = _rel_err(y, ref)
        row["rel_err"] = err
        if not err < cfg.tol:
            row.update(status="FAILED", check=f"rel err {err:.2e} vs the torch path")
            return
        row["check"] = "ok"

        def launch(i):
            paged_decode_attention(*case.args(i), case.sm_scale, max_seq_len=case.ctx)

        us, how = self.time_us(launch, case.nbuf)
        row.update(us=us, timing=how, tbs=row["bytes"] / (us * 1e-6) / 1e12)
        row["frac_copy"] = row["tbs"] / self.copy_tbs if self.copy_tbs else None

    def _sdpa(self, case: _Case, row: dict) -> tuple[Optional[float], str]:
        """Time torch SDPA on this case's keys/values (bf16, contiguous); (µs, note)."""
        try:
            dense = [case.dense(i) for i in range(case.nbuf)]
            qs = [q[:, :, None, :].to(torch.bfloat16) for q in case.qs]
            y = F.scaled_dot_product_attention(qs[0], dense[0][0], dense[0][1], scale=case.sm_scale, enable_gqa=True)
            from rarefy.kernels.paged_attention.torch_decode import paged_decode_attention_torch
            ref = paged_decode_attention_torch(*case.args(0), case.sm_scale).float()
            err = _rel_err(y[:, :, 0], ref)
            if not err < 3 * self.cfg.tol:
                return None, f"SDPA not timed: rel err {err:.2e}"

            def launch(i):
                F.scaled_dot_product_attention(qs[i], dense[i][0], dense[i][1], scale=case.sm_scale, enable_gqa=True)

            us, _ = self.time_us(launch, case.nbuf)
            return us, ""
        except torch.cuda.OutOfMemoryError:
            return None, "SDPA not timed: out of memory"
        finally:
            dense = None
            self.free()

    def _sweep(self, case: _Case, row: dict):
        """Time one-at-a-time changes to the plan (the default's output is the reference)."""
        from rarefy.kernels.paged_attention.plan import plan_decode
        from rarefy.kernels.paged_attention.triton_decode import (
            paged_decode_attention_triton, sm_count_of, v_is_dim_major)

        cfg = self.cfg
        qd = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[cfg.q_dtype]
        vdm = v_is_dim_major(case.v_cache)
        base = plan_decode(case.batch, case.ctx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, case.kv_dtype,
                           cfg.block_size, sm_count_of(self.device), q_dtype=qd, v_dim_major=vdm)
        quant = case.kv_dtype in ("int8", "fp8_e4m3", "fp8_e5m2")
        if cfg.sweep_quant_only and not quant:
            return
        variants = sweep_variants(base, case.kv_dtype, case.batch, cfg.num_kv_heads, sm_count_of(self.device),
                                  generic=not cfg.sweep_quant_only)
        ref = None
        for label, kw in variants.items():
            r = dict(kv_dtype=case.kv_dtype, ctx=case.ctx, batch=case.batch, variant=label, us=None, tbs=None,
                     frac_copy=None, plan_str=None, note="")
            try:
                plan = plan_decode(case.batch, case.ctx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, case.kv_dtype,
                                   cfg.block_size, sm_count_of(self.device), q_dtype=qd, v_dim_major=vdm, **kw)
                r["plan_str"] = plan.describe()
                y = paged_decode_attention_triton(*case.args(0), case.sm_scale, plan=plan)
                if ref is None:
                    ref = y.float()
                err = _rel_err(y, ref)
                if not err < cfg.tol:
                    r["note"] = f"FAILED: rel err {err:.2e}"
                else:
                    us, _ = self.time_us(lambda i, p=plan: paged_decode_attention_triton(
                        *case.args(i), case.sm_scale, plan=p), case.nbuf)
                    r.update(us=us, tbs=row["bytes"] / (us * 1e-6) / 1e12)
                    r["frac_copy"] = r["tbs"] / self.copy_tbs if self.copy_tbs else None
            except Exception as e:  # noqa: BLE001
                r["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                if self.cuda:
                    torch.cuda.synchronize(self.device)
            self.sweep_rows.append(r)


def device_info(device: torch.device) -> dict:
    from rarefy.bench.kernels import device_info as kernels_device_info

    return kernels_device_info(device)


def run_bench(cfg: AttnBenchConfig, progress=None) -> dict:
    """Run the sweep; returns {"info", "config", "rows", "sweep", "targets", "notes"}."""
    if cfg.device not in ("cuda", "cpu"):
        raise RarefyError(f"--device must be cuda or cpu, got {cfg.device}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RarefyError("--device cuda: no CUDA device is visible (use --device cpu)")
    runner = _Runner(cfg, progress)
    info = device_info(runner.device)
    t0 = time.perf_counter()
    runner.copy_tbs = device_copy_bandwidth_tbs(runner.device, cfg.copy_bytes)
    info["copy_tbs"] = runner.copy_tbs
    with torch.no_grad():
        for ctx, batch in cfg.points:
            runner.run_point(ctx, batch)
    info["seconds"] = time.perf_counter() - t0
    config = dict(device=cfg.device, points=[list(p) for p in cfg.points], kv_dtypes=list(cfg.kv_dtypes),
                  num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  block_size=cfg.block_size, q_dtype=str(cfg.q_dtype).replace("torch.", ""), samples=cfg.samples,
                  tol=cfg.tol, seed=cfg.seed, sweep=cfg.sweep, command=cfg.command)
    return {"info": info, "config": config, "rows": runner.rows, "sweep": runner.sweep_rows,
            "targets": targets(runner.rows, cfg.device), "notes": runner.notes}


def targets(rows: list[dict], device: str) -> list[dict]:
    """The issue's targets, measured (GPU; on a CPU the same figures, not judged)."""
    def find(dt, ctx, batch):
        return next((r for r in rows if r["kv_dtype"] == dt and r["ctx"] == ctx and r["batch"] == batch), None)

    out = []
    for ctx, batch in ((32768, 1), (4096, 32)):
        r = find("bf16", ctx, batch)
        if r is not None:
            v = r["frac_copy"]
            out.append(dict(target=f"bf16 {ctx // 1024}k x {batch}: >= {TARGET_COPY_FRACTION:.0%} of copy bandwidth",
                            value=v, shown=f"{v:.0%}" if v is not None else "-",
                            met=None if v is None or device != "cuda" else v >= TARGET_COPY_FRACTION))
    for dt in ("fp8_e4m3", "fp8_e5m2", "int8"):
        r = find(dt, 32768, 1)
        if r is not None:
            v = r["vs_bf16"]
            out.append(dict(target=f"{dt} 32k x 1: >= {TARGET_QUANT_SPEEDUP}x bf16's speed",
                            value=v, shown=f"{v:.2f}x" if v is not None else "-",
                            met=None if v is None or device != "cuda" else v >= TARGET_QUANT_SPEEDUP))
    return out


# ------------------------------------------------------------------------------------ output


# the reports live in attention_report.py; these names stay importable from here
from rarefy.bench.attention_report import (  # noqa: E402,F401
    _stderr_progress, command_line, format_markdown, format_progress, format_table)
