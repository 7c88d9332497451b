"""Compile one pruned matrix: analyse its pattern, pick format + launch config, autotune, cache.

    cm = compile_matrix(w, batch_sizes=(1, 8), cache_dir=None, autotune=True, name="q_proj")
    y = cm(x)              # x [M, K] -> [M, N]
    cm.plan.format         # "bitmap" | "nm" | "bsr" | "delta" | "dense"
    cm.report              # what was chosen, predicted (bytes) and measured speed-ups

The candidates are every format the pattern allows (tiled bitmap always; n:m when every
group holds at most n nonzeros; on GPU, values with 4-bit column gaps below 60% density
and BSR at b = 16/32/64 when the stored blocks cut the bytes by a quarter or more) plus
dense. Each candidate's kernel is specialised through Triton
constexprs (tile sizes, n:m, block size, unroll, split, EVEN shapes without bounds checks)
and, for BSR, a per-matrix launch order (longest block-rows first). With ``autotune`` every
(format, config) is timed on this device for each batch size and the fastest wins, dense
included: a matrix where sparse is slower stays dense. The smallest batch size (decode)
chooses the format; calls with more than PREFILL_ROWS rows on the GPU run a dense GEMM on
the rebuilt weight. The plan is cached on disk as JSON,
keyed by the pattern hash, shape, dtype, device and batch sizes, so a second compile of the
same pattern (in any process) skips the search.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rarefy.formats.sparse_weight import BlockSparse, DeltaSparse, NMSparse, TiledBitmap
from rarefy.kernels.sparse_matmul import sparse_matmul, triton_supports
from rarefy.kernels.sparse_matmul.triton_bitmap import BitmapConfig
from rarefy.kernels.sparse_matmul.triton_nm24 import MAX_M as NM24_MAX_M
from rarefy.kernels.sparse_matmul.triton_nm24 import Nm24Config
from rarefy.kernels.sparse_matmul.triton_bsr import BsrConfig
from rarefy.kernels.sparse_matmul.triton_delta import DeltaConfig

from .pattern import analyze_pattern, pattern_hash

# Bump when kernels or candidate lists change: old cache entries then miss.
KERNEL_VERSION = 6  # 5: the dedicated 2:4 kernel (nm24), geometric-mean format choice; 6: chunked delta
PREFILL_ROWS = 64
MAX_BSR_FILL = 0.75


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAREFY_COMPILE_CACHE", Path.home() / ".cache" / "rarefy" / "compile"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from rarefy.bench.machine import cpu_name
    return f"cpu:{cpu_name()}:threads={torch.get_num_threads()}"


@dataclass
class Plan:
    format: str  # "bitmap" | "nm" | "bsr" | "delta" | "dense"
    param: list = field(default_factory=list)  # nm: [n, m]; bsr: [b]; bitmap: [tile_k]
    configs: dict = field(default_factory=dict)  # str(batch) -> kernel config dict (GPU)
    measured_us: dict = field(default_factory=dict)  # str(batch) -> µs of the chosen kernel
    dense_us: dict = field(default_factory=dict)  # str(batch) -> µs of the dense baseline
    predicted_speedup: float = 1.0  # dense bytes / chosen format's bytes
    candidates: list = field(default_factory=list)  # every (format, batch, config, µs) tried


def encode(w: torch.Tensor, fmt: str, param) -> object:
    if fmt == "bitmap":
        return TiledBitmap.from_dense(w, *param)
    if fmt == "nm":
        return NMSparse.from_dense(w, *param)
    if fmt == "bsr":
        return BlockSparse.from_dense(w, *param)
    if fmt == "delta":
        return DeltaSparse.from_dense(w)
    return w


def _candidate_formats(stats, w: torch.Tensor) -> list[tuple[str, list]]:
    cands = [("dense", [])]
    if stats.density < 0.95:
        cands.append(("bitmap", [512]))
    for n, m in stats.nm:
        cands.append(("nm", [n, m]))
    if w.is_cuda:  # the CPU kernel handles the bitmap layouts only
        if stats.density < 0.6:
            cands.append(("delta", []))
        for b, fill in stats.block_fill.items():
            if fill <= MAX_BSR_FILL:
                cands.append(("bsr", [b]))
    return cands


def _configs(fmt: str, m: int, device: torch.device, param: tuple = ()) -> list:
    """Launch configs worth timing (from sweeps on an H100, docs/results/sparse-kernels.md)."""
    if device.type != "cuda" or fmt == "dense":
        return [None]
    if fmt == "nm" and param == (2, 4) and m <= NM24_MAX_M:  # the dedicated 2:4 kernel (benchmarks/gpu_nm24.py)
        if m == 1:
            return [None] + [Nm24Config(bn, bw, s) for bn, bw, s in ((2, 32, 1), (2, 32, 2), (4, 32, 1), (2, 16, 1))]
        return [None] + [Nm24Config(bn, bw, s, dot=True, num_stages=st)
                         for bn, bw, s, st in ((64, 4, 2, 2), (128, 4, 2, 2), (64, 2, 4, 3), (32, 4, 4, 2))]
    if fmt == "delta":
        bm = 1 if m == 1 else min(8, 1 << (m - 1).bit_length())
        if m == 1:  # the register prefix-sum kernel (benchmarks/gpu_delta.py), and the scan kernel's best
            return [DeltaConfig(1, bv, 1, num_warps=1, chunked=True, prefetch=pf) for bv, pf in
                    ((512, False), (256, True), (512, True))] + [DeltaConfig(2, 256, 1, num_warps=2)]
        return [DeltaConfig(bn, 256, bm, num_warps=1) for bn in (1, 2)]
    if fmt == "bsr":
        bm = 1 if m == 1 else (16 if m <= 16 else 32)
        return [BsrConfig(unroll=u, block_m=bm, split=s, num_warps=nw)
                for u, s, nw in ((2, 8, 4), (4, 8, 4), (2, 4, 2), (4, 1, 4), (2, 1, 2))]
    if m == 1:
        return [BitmapConfig(bn, bk, 1, num_warps=nw) for bn, bk, nw in
                ((2, 512, 1), (1, 1024, 1), (2, 256, 1), (4, 512, 2))]
    if m <= 8:
        bm = 1 << (m - 1).bit_length()
        return [BitmapConfig(bn, bk, bm, num_warps=nw) for bn, bk, nw in ((2, 256, 2), (4, 256, 4), (1, 512, 2))] \
            + [BitmapConfig(32, 128, 16, use_dot=True, num_warps=4)]
    bm = 16 if m <= 16 else 32
    return [BitmapConfig(bn, bk, bm, use_dot=True, num_warps=nw) for bn, bk, nw in ((32, 128, 4), (16, 128, 4))]


def dense_matmul(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """The dense path a DenseLinear/HalfWeightLinear would take for this weight."""
    if x.is_cuda:
        from rarefy.kernels.gemv import gemv
        return gemv(x, w, bias)
    if w.dtype == torch.float16 and x.dtype == torch.float32:
        from rarefy.kernels import gemv_cpu
        if gemv_cpu.available():
            return gemv_cpu.gemv_f16(x, w, bias)
    return F.linear(x, w.to(x.dtype), bias)


L2_BYTES = 50 * 2**20  # H100; copies of a weight are rotated so timing never reads it from L2


def time_us(fns: list, device: torch.device, reps: int = 20) -> float:
    """Median µs of one call. ``fns[i]()`` runs the op on the i-th copy of the weight.

    CUDA: 20 back-to-back calls cycling over the copies, captured in a CUDA graph and
    replayed (the way decode runs them: no launch gaps, weights streamed from HBM);
    CPU: wall clock of fns[0]."""
    if device.type == "cuda":
        calls = 20
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in range(calls):
                fns[c % len(fns)]()
        times = []
        for _ in range(max(3, reps // 4) + 1):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1000 / calls)
        return statistics.median(times[1:])
    fns[0]()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fns[0]()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def copies(obj, nbytes: int, device: torch.device) -> list:
    """obj plus enough clones that cycling through them overflows L2 (CUDA); [obj] on CPU."""
    if device.type != "cuda":
        return [obj]
    n = min(8, max(1, -(-3 * L2_BYTES // max(1, nbytes))))
    return [obj] + [obj.clone() for _ in range(n - 1)]


def _cache_key(phash: str, w: torch.Tensor, batch_sizes, x_dtype) -> str:
    text = json.dumps([KERNEL_VERSION, phash, list(w.shape), str(w.dtype), str(x_dtype),
                       device_name(w.device), sorted(batch_sizes)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _x_dtype(w: torch.Tensor) -> torch.dtype:
    # CPU decode runs fp32 activations against fp16/bf16-stored weights
    return w.dtype if w.is_cuda else torch.float32


def _search(w: torch.Tensor, stats, batch_sizes, autotune: bool) -> Plan:
    cands = _candidate_formats(stats, w)
    dense_bytes = w.numel() * w.element_size()
    encoded = {(f, tuple(p)): encode(w, f, p) for f, p in cands}
    best: dict[int, tuple] = {}
    plan = Plan(format="dense")
    tried = []
    xd = _x_dtype(w)
    dense_ws = copies(w, dense_bytes, w.device) if autotune else [w]
    rotated = {key: copies(sw, sw.nbytes, w.device) if autotune and key[0] != "dense" else [sw]
               for key, sw in encoded.items()}
    for m in batch_sizes:
        x = torch.randn(m, w.shape[1], device=w.device, dtype=xd)
        dense_t = time_us([lambda wi=wi: dense_matmul(x, wi) for wi in dense_ws], w.device) if autotune else None
        plan.dense_us[str(m)] = dense_t
        for (fmt, param), sw in encoded.items():
            if fmt != "dense" and not triton_supports(sw) and w.is_cuda:
                continue
            for cfg in _configs(fmt, m, w.device, tuple(param)):
                if not autotune:
                    t = (sw.nbytes if fmt != "dense" else dense_bytes) / 1e6  # bytes as a proxy
                elif fmt == "dense":
                    t = dense_t
                else:
                    try:
                        t = time_us([lambda si=si, cfg=cfg: sparse_matmul(x, si, config=cfg)
                                     for si in rotated[(fmt, param)]], w.device)
                    except Exception as e:  # a config that does not compile on this device
                        tried.append({"format": fmt, "param": param, "batch": m, "config": _cfg_dict(cfg),
                                      "error": f"{type(e).__name__}: {str(e)[:120]}"})
                        continue
                tried.append({"format": fmt, "param": param, "batch": m, "config": _cfg_dict(cfg),
                              "us" if autotune else "mb": t})
                best.setdefault(m, {})
                key = (fmt, param)
                if key not in best[m] or t < best[m][key][0]:
                    best[m][key] = (t, cfg)
    # One format serves every batch size (the weight is stored once). Timed: the format with
    # the smallest geometric mean of (its time / dense's time) over the requested batch sizes,
    # so a kernel that wins at batch 1 but loses badly at batch 8 (2:4 on the H100) is not
    # picked for a model that will run both; untimed: the smallest batch's byte count decides.
    primary = best[min(best)] if best else {}
    if autotune and primary and all(plan.dense_us.get(str(m)) for m in best):
        def score(key):
            if any(key not in best[m] for m in best):
                return math.inf
            return sum(math.log(best[m][key][0] / plan.dense_us[str(m)]) for m in best) / len(best)
        fmt, param = min(primary, key=score)
    else:
        fmt, param = min(primary, key=lambda key: primary[key][0]) if primary else ("dense", ())
    plan.format, plan.param = fmt, list(param)
    chosen = encoded[(fmt, tuple(param))]
    plan.predicted_speedup = dense_bytes / (chosen.nbytes if fmt != "dense" else dense_bytes)
    for m in batch_sizes:
        t, cfg = best[m][(fmt, tuple(param))]
        plan.configs[str(m)] = _cfg_dict(cfg)
        plan.measured_us[str(m)] = t if autotune else None
    plan.candidates = tried
    return plan


def _cfg_dict(cfg) -> dict | None:
    if cfg is None:
        return None
    return {"kind": type(cfg).__name__, **asdict(cfg)}


def _cfg_from(d: dict | None):
    if not d:
        return None
    d = dict(d)
    kind = d.pop("kind")
    return {"BitmapConfig": BitmapConfig, "BsrConfig": BsrConfig, "DeltaConfig": DeltaConfig,
            "Nm24Config": Nm24Config}[kind](**d)


class CompiledMatrix:
    """A weight in its chosen format with its per-batch launch configs; call it like F.linear."""

    def __init__(self, w: torch.Tensor, plan: Plan, stats, phash: str, name: str, cache_hit: bool):
        self.plan, self.stats, self.pattern_hash, self.name, self.cache_hit = plan, stats, phash, name, cache_hit
        self.weight = encode(w, plan.format, plan.param)
        self.shape = tuple(w.shape)
        self._configs = sorted((int(m), _cfg_from(c)) for m, c in plan.configs.items())

    def config_for(self, m: int):
        for bm, cfg in self._configs:
            if m <= bm:
                return cfg
        return None  # larger than every tuned batch: the kernel's own default

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.plan.format == "dense":
            x2 = x.reshape(-1, x.shape[-1])
            return dense_matmul(x2, self.weight, bias).view(*x.shape[:-1], self.shape[0])
        m = x.numel() // x.shape[-1]
        if x.is_cuda and m > PREFILL_ROWS:
            # prefill-sized: the decode kernels are not built for it; a dense GEMM on the
            # rebuilt weight is (the rebuild costs about one weight copy)
            return F.linear(x, self.weight.to_dense().to(x.dtype), bias)
        return sparse_matmul(x, self.weight, bias, config=self.config_for(m))

    @property
    def report(self) -> dict:
        p = self.plan
        speedups = {m: (p.dense_us[m] / p.measured_us[m]) if p.dense_us.get(m) and p.measured_us.get(m) else None
                    for m in p.measured_us}
        return {"name": self.name, "shape": list(self.shape), "format": p.format, "param": p.param,
                "configs": p.configs, "predicted_speedup": round(p.predicted_speedup, 3),
                "measured_us": p.measured_us, "dense_us": p.dense_us, "measured_speedup": speedups,
                "density": round(self.stats.density, 4), "pattern": self.stats.to_dict(),
                "pattern_hash": self.pattern_hash, "cache_hit": self.cache_hit}


def compile_matrix(w: torch.Tensor, batch_sizes=(1,), cache_dir: str | os.PathLike | None = None,
                   autotune: bool = True, name: str = "") -> CompiledMatrix:
    """Compile dense-with-zeros weight ``w`` [N, K] (on its device) for the given batch sizes."""
    if w.dim() != 2:
        raise ValueError(f"compile_matrix takes a 2-D weight, got {tuple(w.shape)}")
    batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
    stats = analyze_pattern(w)
    phash = pattern_hash(w)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{_cache_key(phash, w, batch_sizes, _x_dtype(w))}.json"
    if autotune and path.is_file():
        try:
            plan = Plan(**json.loads(path.read_text()))
            return CompiledMatrix(w, plan, stats, phash, name, cache_hit=True)
        except (ValueError, TypeError, KeyError):
            pass  # damaged or older entry: search again and overwrite it
    plan = _search(w, stats, batch_sizes, autotune)
    if autotune:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(plan)))
        os.replace(tmp, path)
    return CompiledMatrix(w, plan, stats, phash, name, cache_hit=False)
