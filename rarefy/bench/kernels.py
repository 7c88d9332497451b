"""`rarefy bench kernels`: sparse matmul kernels against dense and torch.sparse baselines.

For each weight shape [N, K] and sparsity pattern a random normal bf16 weight is magnitude
pruned to the pattern (the values do not matter for speed, the pattern does), then every
method computes ``y = x @ W.T`` for each batch M:

GPU (``device="cuda"``)
    dense           cuBLAS: ``F.linear`` on the dense (unpruned) weight; timed once per
                    shape and batch, the reference for the speed-ups
    rarefy_dense    rarefy's dense Triton GEMV (``rarefy.kernels.gemv.gemv``), second
                    reference
    csr             torch.sparse CSR (cuSPARSE SpMM), int32 indices: ``torch.sparse.mm(W_csr, x.T)``
    semi24          ``torch.sparse.to_sparse_semi_structured`` (2:4 only; cuSPARSELt or CUTLASS)
    sparse_matmul   ``rarefy.kernels.sparse_matmul.sparse_matmul(x, sw)`` with the explicit
                    format: bitmap (unstructured), nm (2:4, 4:8), bsr (block)
    rarefy          ``rarefy.sparse_compiler.compile_matrix(w, batch_sizes=batches)``: the
                    format and kernel the sparse compiler picks
CPU (``device="cpu"``)
    dense (F.linear in the bench dtype), dense_fp32, rarefy_dense (fp16-weight C++ GEMV),
    csr, csr_fp32 (torch's CPU CSR matmul has no bf16), sparse_matmul, rarefy

Every method is first checked on the same data against a float64 reference
(``sparse_matmul_ref`` of the explicit format, which rebuilds the pruned weight exactly):
``||y - ref|| / ||ref|| < 1e-2`` and no NaN, else a rarefy row is FAILED and not timed. The
torch baselines are timed anyway when only the tolerance is missed (cuSPARSE's bf16 SpMM is
at 1.1e-2 for K = 4096, M = 8 on an H100), with "INACCURATE: rel err ..." in the note.

Timing (see rarefy.bench.gpu_timing): on the GPU, back-to-back launches replayed from a
CUDA graph, rotating over copies of the weight that together exceed 4x L2 so L2 never
serves a repeat; where a launch cannot be captured, ``triton.testing.do_bench`` (clean L2)
with the same rotation. On the CPU, wall-clock time of back-to-back calls rotating over
copies totalling 2x the last-level cache (at most 256 copies). The median is reported.

Bytes are what the kernel must move: the weight as stored (values + metadata: for rarefy
``weight.nbytes`` of the sparse format; CSR values + indices; 2:4 packed values + metadata)
+ x + out. TB/s = bytes / time; "% copy" compares it with the device-to-device copy bandwidth
(read + write) measured in the same run.

This module holds the config and the runner (the check, the timing, the sweep); the rest
lives in kernel_cases (shapes, patterns, the --shapes/--patterns/--batches parsers),
kernel_methods (the methods above and how each is prepared), cpu_timing (CPU timing) and
kernels_report (summary, table, markdown). Their public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from rarefy.errors import RarefyError

from .cpu_timing import _cpu_cache_bytes, cpu_copy_bandwidth_tbs, cpu_time_us
from .kernel_cases import (
    DEFAULT_PATTERNS,
    LLAMA3_8B_SHAPES,
    QWEN35_27B_SHAPES,
    SHAPE_SETS,
    SMOLLM2_SHAPES,
    SUMMARY_PREFIX,
    BenchPattern,
    Shape,
    parse_batches,
    parse_patterns,
    parse_shapes,
)
from .kernel_methods import (
    Case,
    Method,
    Prepared,
    Unavailable,
    Unsupported,
    _dt,
    _tensor_bytes,
    cpu_methods,
    gpu_methods,
)
from .machine import device_copy_bandwidth_tbs
from .kernels_report import (
    SUMMARY_PATTERNS,
    _stderr_progress,
    format_markdown,
    format_progress,
    format_summary,
    format_table,
    summarize,
)

# the public names used through `rarefy.bench.kernels` (with those defined here)
__all__ = [
    "DEFAULT_PATTERNS", "DTYPES", "LLAMA3_8B_SHAPES", "QWEN35_27B_SHAPES", "SHAPE_SETS", "SMOLLM2_SHAPES",
    "SUMMARY_PATTERNS", "SUMMARY_PREFIX", "BenchConfig", "BenchPattern", "Case", "Method", "Prepared", "Shape",
    "Unavailable", "Unsupported", "_stderr_progress", "cpu_copy_bandwidth_tbs", "cpu_methods", "cpu_time_us",
    "default_config", "device_info", "format_markdown", "format_progress", "format_summary", "format_table",
    "gpu_methods", "parse_batches", "parse_patterns", "parse_shapes", "run_bench", "summarize",
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ------------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    shapes: tuple[Shape, ...] = SMOLLM2_SHAPES
    patterns: tuple[BenchPattern, ...] = field(default_factory=lambda: parse_patterns(DEFAULT_PATTERNS))
    batches: tuple[int, ...] = (1, 4)
    methods: Optional[tuple[str, ...]] = None  # keys to run; None = all for the device
    max_seconds: Optional[float] = None  # stop timing (rows "skipped") after this long
    samples: int = 5  # graph replays (GPU) or timed bursts (CPU) per measurement; median
    cpu_sample_s: float = 0.01  # CPU: length of one timed burst
    copy_bytes: Optional[int] = None  # copy-bandwidth buffer (default 1 GiB GPU, 256 MiB CPU)
    max_buffers: Optional[int] = None  # cap on rotating copies (default 512 GPU, 256 CPU)
    tol: float = 1e-2
    seed: int = 0
    command: str = ""


def default_config(device: str, quick: bool = False, **kw) -> BenchConfig:
    """Defaults: GPU all Llama-3-8B + Qwen3.5-27B shapes at batches 1..32 (quick: Llama, 1 and 8);
    CPU the SmolLM2-135M shapes at batches 1, 4 (quick: batch 1)."""
    if device == "cuda":
        shapes = LLAMA3_8B_SHAPES if quick else LLAMA3_8B_SHAPES + QWEN35_27B_SHAPES
        batches = (1, 8) if quick else (1, 2, 4, 8, 16, 32)
    else:
        shapes, batches = SMOLLM2_SHAPES, ((1,) if quick else (1, 4))
    return BenchConfig(**{"device": device, "shapes": shapes, "batches": batches, **kw})


# ------------------------------------------------------------------------------ running


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    y = y.detach()
    nan = bool(torch.isnan(y).any())
    if tuple(y.shape) != tuple(ref.shape):
        return math.inf, nan
    d = y.double()
    err = ((d - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    return (err if math.isfinite(err) else math.inf), nan


class _Runner:
    def __init__(self, cfg: BenchConfig, methods: list[Method], progress):
        self.cfg = cfg
        self.device = torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
        self.cuda = self.device.type == "cuda"
        self.methods = methods
        self.progress = progress or (lambda row: None)
        self.rows: list[dict] = []
        self.notes: dict[str, str] = {}  # method key -> why it has no numbers
        self.fatal: Optional[str] = None
        self.copy_tbs: Optional[float] = None
        self.case_seconds: list[dict] = []  # where the time went (for keeping the sweep short)
        self.t0 = time.perf_counter()
        if self.cuda:
            from rarefy.bench.gpu_timing import l2_bytes

            self.cache_bytes = l2_bytes(self.device)
            self.target_bytes = 4 * self.cache_bytes
            self.max_buffers = cfg.max_buffers or 512
        else:
            self.cache_bytes = _cpu_cache_bytes()
            self.target_bytes = min(max(2 * self.cache_bytes, 32 * 2**20), 512 * 2**20)
            self.max_buffers = cfg.max_buffers or 256
        self.dense_us: dict[tuple[int, int, int], float] = {}  # (N, K, M) -> dense reference µs
        self.rdense_us: dict[tuple[int, int, int], float] = {}

    # -- helpers
    def out_of_time(self) -> bool:
        return self.cfg.max_seconds is not None and time.perf_counter() - self.t0 > self.cfg.max_seconds

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def alive(self) -> bool:
        """After an exception on CUDA: is the context still usable?"""
        if not self.cuda:
            return True
        try:
            torch.cuda.synchronize(self.device)
            torch.zeros(1, device=self.device).add_(1).item()
            return True
        except Exception:
            return False

    def time_us(self, launch, nbuf: int) -> tuple[float, str]:
        if not self.cuda:
            with torch.no_grad():
                return cpu_time_us(launch, nbuf, self.cfg.samples, self.cfg.cpu_sample_s), "wall clock"
        from rarefy.bench.gpu_timing import do_bench_us, graph_time_us

        try:
            return graph_time_us(launch, nbuf, self.device, samples=self.cfg.samples), "cuda graph"
        except Exception as e:
            if not self.alive():
                raise
            how = f"do_bench (graph capture failed: {type(e).__name__})"
        return do_bench_us(launch, nbuf, clean_l2=True, warmup=10, rep=50), how

    def row(self, case: Case, method: Method, m: int, status: str, note: str = "", **kw) -> dict:
        p = case.pattern
        r = dict(shape=case.shape.name, n=case.shape.n, k=case.shape.k,
                 pattern=p.label if p else "dense", pattern_spec=p.spec if p else "dense",
                 pattern_kind=p.kind if p else "dense", sparsity=p.sparsity if p else 0.0,
                 density=case.density, batch=m, method=method.key, label=method.label, dtype=_dt(case.dtype),
                 status=status,
                 us=None, timing=None, nbuf=None, bytes=None, mb=None, tbs=None, frac_copy_bw=None,
                 speedup_vs_dense=None, speedup_vs_rarefy_dense=None, rel_err=None, note=note, info={})
        r.update(kw)
        self._speedups(r)
        self.rows.append(r)
        self.progress(r)
        return r

    def _speedups(self, r: dict) -> None:
        if r["us"] is None:
            return
        key = (r["n"], r["k"], r["batch"])
        if key in self.dense_us:
            r["speedup_vs_dense"] = self.dense_us[key] / r["us"]
        if key in self.rdense_us:
            r["speedup_vs_rarefy_dense"] = self.rdense_us[key] / r["us"]

    # -- one method on one case
    def run_method(self, case: Case, method: Method, ref: torch.Tensor) -> None:
        batches = case.batches
        if self.fatal:
            for m in batches:
                self.row(case, method, m, "skipped", self.fatal)
            return
        if self.out_of_time():
            for m in batches:
                self.row(case, method, m, "skipped", "time budget (--max-minutes) spent")
            return
        try:
            prep = method.prepare(case)
            self.sync()
        except Unavailable as e:
            self.notes.setdefault(method.key, str(e))
            for m in batches:
                self.row(case, method, m, "unavailable", str(e))
            return
        except (Unsupported, NotImplementedError) as e:
            for m in batches:
                self.row(case, method, m, "unsupported", _short(e))
            return
        except Exception as e:  # noqa: BLE001 - a baseline that breaks must not stop the sweep
            self._error(case, method, batches, e, "prepare")
            return
        try:
            self._check_and_time(case, method, prep, ref)
        finally:
            del prep
            self.free()

    def _error(self, case, method, batches, e, where):
        status = "unsupported" if _looks_unsupported(e) else "error"
        if self.cuda and not self.alive():
            self.fatal = f"CUDA context lost after {method.key} on {case.shape.dims} ({_short(e)})"
            status = "error"
        for m in batches:
            self.row(case, method, m, status, f"{where}: {_short(e)}")

    def _check_and_time(self, case: Case, method: Method, prep: Prepared, ref: torch.Tensor) -> None:
        xs = {m: (case.x[:m] if prep.x_dtype is None else case.x[:m].to(prep.x_dtype)) for m in case.batches}
        checked: dict[int, tuple[float, int]] = {}  # M -> (rel err, bytes of x + out)
        for m in case.batches:
            try:
                with torch.no_grad():
                    y = prep.call(prep.weight, xs[m])
                self.sync()
            except Exception as e:  # noqa: BLE001
                self._error(case, method, (m,), e, "run")
                if self.fatal:
                    return
                continue
            err, nan = _rel_err(y, ref[:m])
            io_bytes = _tensor_bytes(xs[m]) + m * case.shape.n * y.element_size()
            if nan or (method.gate and not err < self.cfg.tol):
                why = (["NaN in output"] if nan else []) + ([f"rel err {err:.3g} >= {self.cfg.tol:g}"]
                                                            if not err < self.cfg.tol else [])
                self.row(case, method, m, "FAILED", "; ".join(why) + (f" ({prep.note})" if prep.note else ""),
                         rel_err=err if math.isfinite(err) else None, info=_jsonable(prep.info))
            else:
                checked[m] = (err, io_bytes)
            del y
        if not checked:
            return
        m0 = min(checked)
        bufs, rot_note = self._buffers(case, prep, xs, ref, m0, max(self.cfg.tol, 2 * checked[m0][0]))
        for m, (err, io_bytes) in checked.items():
            if self.fatal:
                self.row(case, method, m, "skipped", self.fatal)
                continue
            if self.out_of_time():
                self.row(case, method, m, "skipped", "time budget (--max-minutes) spent", rel_err=err)
                continue
            x = xs[m]
            try:
                with torch.no_grad():
                    us, how = self.time_us(lambda i, x=x: prep.call(bufs[i], x), len(bufs))
            except Exception as e:  # noqa: BLE001
                self._error(case, method, (m,), e, "timing")
                continue
            nbytes = prep.weight_bytes + io_bytes
            tbs = nbytes / (us * 1e-6) / 1e12
            inexact = f"INACCURATE: rel err {err:.3g} >= {self.cfg.tol:g} (baseline, timed anyway)" \
                if not err < self.cfg.tol else ""
            note = "; ".join(v for v in (inexact, prep.note, prep.batch_notes.get(m, ""), rot_note) if v)
            self.row(case, method, m, "ok", note, us=us, timing=how, nbuf=len(bufs), bytes=nbytes,
                     mb=nbytes / 1e6, tbs=tbs, frac_copy_bw=tbs / self.copy_tbs if self.copy_tbs else None,
                     rel_err=err, info=_jsonable(prep.info))
            if method.key == "dense" or (method.key == "dense_fp32" and not self.cuda):
                k = (case.shape.n, case.shape.k, m)
                self.dense_us[k] = min(us, self.dense_us.get(k, math.inf))
            elif method.key == "rarefy_dense":
                self.rdense_us[(case.shape.n, case.shape.k, m)] = us

    def _buffers(self, case, prep, xs, ref, m_check, limit):
        """The weight and enough independent copies to exceed the cache.

        The first and the last copy are checked like the original (a copy that computes
        something else, e.g. a deepcopy that lost state, would fail them all alike); if one
        fails, only the original is timed and the note says so."""
        nbuf = min(self.max_buffers, max(2, math.ceil(self.target_bytes / max(1, prep.weight_bytes))))
        bufs = [prep.weight]
        if prep.copy is None:
            return bufs, "no rotation (no copy)"
        try:
            for i in range(1, nbuf):
                c = prep.copy(prep.weight)
                if i in (1, nbuf - 1):
                    with torch.no_grad():
                        y = prep.call(c, xs[m_check])
                    err, nan = _rel_err(y, ref[:m_check])
                    if nan or not err < limit:
                        raise RuntimeError(f"a copy of the weight fails the check (rel err {err:.3g})")
                bufs.append(c)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory, deepcopy refused
            if self.cuda and not self.alive():
                raise
            self.free()
            return bufs, f"rotating over {len(bufs)} of {nbuf} copies ({_short(e)})"
        return bufs, ""

    # -- the sweep
    def run(self) -> None:
        cfg = self.cfg
        gen_dev = self.device
        mmax = max(cfg.batches)
        dense_methods = [m for m in self.methods if m.dense]
        sparse_methods = [m for m in self.methods if not m.dense]
        for si, shape in enumerate(cfg.shapes):
            g = torch.Generator(device=gen_dev).manual_seed(cfg.seed * 7919 + shape.n * 31 + shape.k)
            w0 = (torch.randn(shape.n, shape.k, device=gen_dev, generator=g) / math.sqrt(shape.k)).to(cfg.dtype)
            x = torch.randn(mmax, shape.k, device=gen_dev, generator=g).to(cfg.dtype)
            case = Case(shape, None, w0, None, x, cfg.batches, self.device, cfg.dtype)
            if dense_methods:
                tc, per_method = time.perf_counter(), {}
                ref = x.double() @ w0.double().T
                for method in dense_methods:
                    tm = time.perf_counter()
                    self.run_method(case, method, ref)
                    per_method[method.key] = round(time.perf_counter() - tm, 2)
                del ref
                self.case_seconds.append(dict(shape=shape.dims, pattern="dense",
                                              seconds=round(time.perf_counter() - tc, 2), methods=per_method))
            for pattern in cfg.patterns:
                methods = [m for m in sparse_methods if m.applies(pattern)]
                if not methods:
                    continue
                why = pattern.unfit_reason(shape.n, shape.k)
                if why:
                    pcase = Case(shape, pattern, w0, None, x, cfg.batches, self.device, cfg.dtype)
                    for method in methods:
                        for m in cfg.batches:
                            self.row(pcase, method, m, "skipped", why)
                    continue
                if self.fatal:
                    pcase = Case(shape, pattern, w0, None, x, cfg.batches, self.device, cfg.dtype)
                    for method in methods:
                        for m in cfg.batches:
                            self.row(pcase, method, m, "skipped", self.fatal)
                    continue
                tc = time.perf_counter()
                keep = pattern.keep_mask(w0.float().abs())
                w = w0.masked_fill(~keep, 0)
                density = keep.float().mean().item()
                del keep
                try:
                    sw = pattern.to_format(w)
                    ref = _sparse_ref(x, sw)
                except Exception as e:  # noqa: BLE001 - the format builder is someone else's code
                    sw = None
                    self.notes.setdefault(f"format {pattern.format}", f"{pattern.format}.from_dense failed: {_short(e)}")
                    ref = x.double() @ w.double().T
                pcase = Case(shape, pattern, w, sw, x, cfg.batches, self.device, cfg.dtype, density)
                per_method = {}
                for method in methods:
                    tm = time.perf_counter()
                    self.run_method(pcase, method, ref)
                    per_method[method.key] = round(time.perf_counter() - tm, 2)
                self.case_seconds.append(dict(shape=shape.dims, pattern=pattern.spec,
                                              seconds=round(time.perf_counter() - tc, 2), methods=per_method))
                del w, sw, ref, pcase
                self.free()
            del w0, x, case
            self.free()


def _sparse_ref(x, sw):
    from rarefy.kernels.sparse_matmul.ref import sparse_matmul_ref

    return sparse_matmul_ref(x, sw)


def _short(e: BaseException, n: int = 160) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _looks_unsupported(e: BaseException) -> bool:
    s = str(e).lower()
    return isinstance(e, NotImplementedError) or any(
        w in s for w in ("not implemented", "not supported", "unsupported", "only supported"))


def _jsonable(v, depth: int = 0):
    if depth > 6:
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x, depth + 1) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist(), depth + 1) if v.numel() <= 64 else f"tensor{tuple(v.shape)}"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _jsonable({f.name: getattr(v, f.name) for f in dataclasses.fields(v)}, depth + 1)
    return str(v)


# ---------------------------------------------------------------------------- the bench


def device_info(device: torch.device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda,
                    memory_gb=round(props.total_memory / 1e9, 1))
    else:
        from rarefy.bench.machine import cpu_name

        info.update(device=f"{cpu_name()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)")
    return info


def run_bench(cfg: BenchConfig, progress=None, extra_methods: Optional[list[Method]] = None,
              methods: Optional[list[Method]] = None) -> dict:
    """Run the sweep; returns {"info", "config", "rows", "summary", "notes", "case_seconds"}.

    `methods` replaces the device's method list; `extra_methods` are appended (the tests
    inject a wrong kernel this way). `progress(row)` is called for every row as it is made.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RarefyError("--device cuda: no CUDA device is visible (use --device cpu)")
    if cfg.device not in ("cuda", "cpu"):
        raise RarefyError(f"--device must be cuda or cpu, got {cfg.device}")
    all_methods = list(methods) if methods is not None else (
        gpu_methods() if cfg.device == "cuda" else cpu_methods(cfg.dtype))
    if cfg.methods is not None:
        known = {m.key for m in all_methods}
        bad = [k for k in cfg.methods if k not in known]
        if bad:
            raise RarefyError(f"--methods: unknown {', '.join(bad)} for --device {cfg.device} "
                              f"(choose from {', '.join(sorted(known))})")
        all_methods = [m for m in all_methods if m.key in cfg.methods]
    all_methods += list(extra_methods or [])

    runner = _Runner(cfg, all_methods, progress)
    info = device_info(runner.device)
    t0 = time.perf_counter()
    runner.copy_tbs = device_copy_bandwidth_tbs(runner.device, cfg.copy_bytes)
    info.update(copy_tbs=runner.copy_tbs, cache_bytes=runner.cache_bytes, rotation_target_bytes=runner.target_bytes,
                dtype=_dt(cfg.dtype), dense_reference="cuBLAS (F.linear)" if runner.cuda
                else "torch F.linear, the faster of fp32 and " + _dt(cfg.dtype),
                rarefy_dense_reference="rarefy.kernels.gemv.gemv (Triton)" if runner.cuda
                else "rarefy.kernels.gemv_cpu.gemv_f16")
    with torch.no_grad():
        runner.run()
    info["seconds"] = time.perf_counter() - t0
    if runner.fatal:
        runner.notes["fatal"] = runner.fatal
    if cfg.max_seconds is not None and any(r["status"] == "skipped" and "time budget" in r["note"]
                                           for r in runner.rows):
        runner.notes["time budget"] = (f"stopped timing after {cfg.max_seconds / 60:.1f} min; "
                                       "later rows are 'skipped' (raise --max-minutes)")
    for r in runner.rows:  # dense references that came later (e.g. fp32 after bf16 on CPU)
        runner._speedups(r)
    config = dict(device=cfg.device, dtype=_dt(cfg.dtype), shapes=[dataclasses.asdict(s) for s in cfg.shapes],
                  patterns=[p.spec for p in cfg.patterns], batches=list(cfg.batches),
                  methods=[m.key for m in all_methods], samples=cfg.samples, tol=cfg.tol, seed=cfg.seed,
                  max_seconds=cfg.max_seconds, command=cfg.command)
    return {"info": info, "config": config, "rows": runner.rows,
            "summary": summarize(runner.rows, cfg), "notes": runner.notes, "case_seconds": runner.case_seconds}
