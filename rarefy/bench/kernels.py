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
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from rarefy.errors import RarefyError

# ------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """A weight matrix [N, K] (nn.Linear layout: N outputs, K inputs)."""

    name: str
    n: int
    k: int

    @property
    def dims(self) -> str:
        return f"{self.n}x{self.k}"


LLAMA3_8B_SHAPES = (
    Shape("llama3-8b q/o", 4096, 4096),
    Shape("llama3-8b k/v", 1024, 4096),
    Shape("llama3-8b gate/up", 14336, 4096),
    Shape("llama3-8b down", 4096, 14336),
)
QWEN35_27B_SHAPES = (  # hidden 5120, FFN 17408, q projection 6144
    Shape("qwen3.5-27b 5120x5120", 5120, 5120),
    Shape("qwen3.5-27b gate/up", 17408, 5120),
    Shape("qwen3.5-27b down", 5120, 17408),
    Shape("qwen3.5-27b q_proj", 6144, 5120),
)
SMOLLM2_SHAPES = (  # the embedded SmolLM2-135M: hidden 576, MLP 1536, 3 KV heads of 64
    Shape("smollm2 q/o", 576, 576),
    Shape("smollm2 k/v", 192, 576),
    Shape("smollm2 gate/up", 1536, 576),
    Shape("smollm2 down", 576, 1536),
)
SHAPE_SETS = {"llama3-8b": LLAMA3_8B_SHAPES, "qwen3.5-27b": QWEN35_27B_SHAPES, "smollm2": SMOLLM2_SHAPES}
SUMMARY_PREFIX = "llama3-8b"  # the summary's medians are over these shapes


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """"llama3-8b,qwen3.5-27b" (set names), "4096x4096,64x96" (N x K) or a mix."""
    out: list[Shape] = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item.lower() in SHAPE_SETS:
            out.extend(SHAPE_SETS[item.lower()])
            continue
        try:
            n_s, k_s = item.lower().split("x")
            n, k = int(n_s), int(k_s)
        except ValueError:
            raise RarefyError(f"--shapes: '{item}' is neither NxK (e.g. 4096x4096) nor one of "
                              f"{', '.join(SHAPE_SETS)}") from None
        if n < 1 or k < 1:
            raise RarefyError(f"--shapes: {item} has a non-positive side")
        known = [s for group in SHAPE_SETS.values() for s in group if (s.n, s.k) == (n, k)]
        out.append(known[0] if known else Shape(f"{n}x{k}", n, k))
    if not out:
        raise RarefyError("--shapes: give at least one shape")
    seen, uniq = set(), []
    for s in out:
        if (s.n, s.k) not in seen:
            seen.add((s.n, s.k))
            uniq.append(s)
    return tuple(uniq)


# ----------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class BenchPattern:
    """A sparsity pattern: unstructured at `sparsity`, n:m, or square blocks at `sparsity`."""

    kind: str  # "unstructured" | "nm" | "block"
    sparsity: float
    n: int = 0
    m: int = 0
    block: int = 0

    @property
    def label(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block} {self.sparsity:.0%}"
        return f"unstr {self.sparsity:.0%}"

    @property
    def spec(self) -> str:
        """The --patterns text that gives this pattern."""
        pct = f"{100 * self.sparsity:g}"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"b{self.block}@{pct}"
        return pct

    @property
    def format(self) -> str:
        """The explicit rarefy format for this pattern."""
        return {"unstructured": "bitmap", "nm": "nm", "block": "bsr"}[self.kind]

    def unfit_reason(self, n: int, k: int) -> Optional[str]:
        if self.kind == "nm" and k % self.m:
            return f"K={k} is not a multiple of {self.m}"
        if self.kind == "block" and (n % self.block or k % self.block):
            return f"block {self.block} does not divide {n}x{k}"
        return None

    def keep_mask(self, score: torch.Tensor) -> torch.Tensor:
        from rarefy.sparsity.masks import block_mask, nm_mask, unstructured_mask

        if self.kind == "nm":
            return nm_mask(score, self.n, self.m)
        if self.kind == "block":
            return block_mask(score, self.sparsity, self.block, self.block)
        return unstructured_mask(score, self.sparsity)

    def to_format(self, w: torch.Tensor):
        from rarefy.formats.sparse_weight import BlockSparse, NMSparse, TiledBitmap

        if self.kind == "nm":
            return NMSparse.from_dense(w, self.n, self.m)
        if self.kind == "block":
            return BlockSparse.from_dense(w, self.block)
        return TiledBitmap.from_dense(w)


# Block patterns at both 50% and 75% of the blocks removed: 50% is the sparsity where the
# unstructured/2:4 comparison is made, 75% is where block sparsity has a quality budget to
# spend (whole blocks hurt more than single weights at the same count).
DEFAULT_PATTERNS = "50,70,75,90,2:4,4:8,b16@50,b32@50,b64@50,b16@75,b32@75,b64@75"


def parse_patterns(text: str) -> tuple[BenchPattern, ...]:
    """"50,90" unstructured %, "2:4" n:m, "b16@50" blocks of 16x16 with 50% of blocks removed."""
    out: list[BenchPattern] = []
    for item in (v.strip().lower().rstrip("%") for v in text.split(",")):
        if not item:
            continue
        try:
            if ":" in item:
                n_s, m_s = item.split(":")
                n, m = int(n_s), int(m_s)
                if not (0 < n < m) or 32 % m:
                    raise RarefyError(f"--patterns: {item} needs 0 < n < m and m dividing 32")
                out.append(BenchPattern("nm", 1 - n / m, n=n, m=m))
            elif item.startswith("b"):
                b_s, _, s_s = item.removeprefix("block").removeprefix("b").partition("@")
                b, s = int(b_s), float(s_s or 50)
                if b < 1:
                    raise RarefyError(f"--patterns: block size must be positive in {item}")
                out.append(BenchPattern("block", _pct(s, item), block=b))
            else:
                out.append(BenchPattern("unstructured", _pct(float(item.removeprefix("u")), item)))
        except ValueError:
            raise RarefyError(f"--patterns: cannot read '{item}' (expected e.g. 50, 2:4, b16@50)") from None
    if not out:
        raise RarefyError("--patterns: give at least one pattern")
    return tuple(dict.fromkeys(out))


def _pct(v: float, item: str) -> float:
    if not 0 < v < 100:
        raise RarefyError(f"--patterns: sparsity in '{item}' must be a percentage in (0, 100)")
    return v / 100


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        vals = sorted({int(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError:
        raise RarefyError(f"--batches: expected comma-separated integers, got '{text}'") from None
    if not vals or vals[0] < 1:
        raise RarefyError(f"--batches: batches must be positive integers, got '{text}'")
    return tuple(vals)


# ------------------------------------------------------------------------------ methods


class Unsupported(Exception):
    """The method does not handle this case (dtype, device, shape)."""


class Unavailable(Exception):
    """The method's code is not there (module not written yet, extension did not build)."""


@dataclass
class Case:
    """What a method gets: one shape, one pattern (None for the dense rows), its data."""

    shape: Shape
    pattern: Optional[BenchPattern]
    w: torch.Tensor  # [N, K] dense in the bench dtype; pruned to `pattern` (zeros = pruned)
    sw: Any  # the explicit SparseWeight of `pattern` (None for dense rows or if it failed)
    x: torch.Tensor  # [max batch, K] in the bench dtype; batch M uses x[:M]
    batches: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    density: float = 1.0  # share of nonzero weights in `w`


@dataclass
class Prepared:
    """A method made ready for one case.

    ``call(weight, x) -> y [M, N]`` runs it; ``copy(weight)`` makes an independent copy of
    the weight operand (other memory) for rotation; ``weight_bytes`` is what one call reads
    of it; ``x_dtype`` converts x before the call (fp32 methods). ``batch_notes`` may be
    filled by ``call`` during the check (e.g. "x padded to 16 rows").
    """

    weight: Any
    call: Callable[[Any, torch.Tensor], torch.Tensor]
    weight_bytes: int
    copy: Optional[Callable[[Any], Any]] = None
    x_dtype: Optional[torch.dtype] = None
    note: str = ""
    info: dict = field(default_factory=dict)
    batch_notes: dict = field(default_factory=dict)  # M -> extra note for that batch's row


@dataclass
class Method:
    """`gate`: a row that misses the tolerance is FAILED and not timed (rarefy's kernels, and
    anything injected). Baselines are not gated: they are timed anyway with the error in the
    note (cuSPARSE's bf16 SpMM misses 1e-2 at some shapes); NaN fails every method."""

    key: str
    label: str
    dense: bool  # timed once per shape on the unpruned weight (else per pattern)
    prepare: Callable[[Case], Prepared]
    applies: Callable[[Optional[BenchPattern]], bool] = lambda p: True
    gate: bool = True


def _clone_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _clone_sparse_weight(sw):
    return dataclasses.replace(sw, **{k: t.clone() for k, t in sw.tensors().items()})


def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _prep_dense(case: Case) -> Prepared:
    return Prepared(case.w, lambda w, x: F.linear(x, w), _tensor_bytes(case.w), _clone_tensor)


def _prep_dense_fp32(case: Case) -> Prepared:
    w = case.w.float()
    return Prepared(w, lambda w, x: F.linear(x, w), _tensor_bytes(w), _clone_tensor, x_dtype=torch.float32)


def _prep_rarefy_dense(case: Case) -> Prepared:
    if case.device.type == "cuda":
        from rarefy.kernels.gemv import MAX_M, gemv, triton_available

        if not triton_available():
            raise Unavailable("Triton is not available")
        big = [m for m in case.batches if m > MAX_M]
        note = f"M>{MAX_M} falls back to F.linear" if big else ""
        return Prepared(case.w, lambda w, x: gemv(x, w), _tensor_bytes(case.w), _clone_tensor, note=note)
    from rarefy.kernels import gemv_cpu

    if not gemv_cpu.available():
        raise Unavailable(f"gemv_f16 extension unavailable: {gemv_cpu._state['error']}")
    w16 = case.w.half()
    return Prepared(w16, lambda w, x: gemv_cpu.gemv_f16(x, w), _tensor_bytes(w16), _clone_tensor,
                    x_dtype=torch.float32, note="fp16 weights, fp32 x")


def _csr(w: torch.Tensor) -> torch.Tensor:
    """CSR of `w`; on CUDA with int32 indices (cuSPARSE takes them natively: fewer bytes than
    torch's default int64). On the CPU torch's CSR matmul is slower with int32, so int64 stays."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta", invariant checks
        c = w.to_sparse_csr()
        if not w.is_cuda:
            return c
        return torch.sparse_csr_tensor(c.crow_indices().to(torch.int32), c.col_indices().to(torch.int32),
                                       c.values(), c.shape)


def _csr_bytes(c: torch.Tensor) -> int:
    return _tensor_bytes(c.values(), c.col_indices(), c.crow_indices())


def _csr_call(c, x):
    # W_csr @ x.T; the transposed copy of x is part of the call (on an H100 it is 1.3-1.4x
    # faster at M = 8 than handing cuSPARSE the strided x.t()).
    return torch.sparse.mm(c, x.t().contiguous()).t()


def _prep_csr(case: Case, dtype: Optional[torch.dtype] = None) -> Prepared:
    w = case.w if dtype is None else case.w.to(dtype)
    c = _csr(w)
    return Prepared(c, _csr_call, _csr_bytes(c), _clone_tensor, x_dtype=dtype,
                    note=f"{str(c.col_indices().dtype).removeprefix('torch.')} indices")


def _prep_semi24(case: Case) -> Prepared:
    if case.device.type != "cuda":
        raise Unsupported("CUDA only")
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError as e:
        raise Unavailable(f"torch.sparse.to_sparse_semi_structured missing ({e})") from None
    sw = to_sparse_semi_structured(case.w)
    backend = getattr(sw, "BACKEND", type(sw).__name__)
    try:
        min_rows = sw._DTYPE_SHAPE_CONSTRAINTS[case.dtype].dense_min_rows
    except Exception:
        min_rows = 1
    pad_rows: dict[int, int] = {}  # M -> padded M, set when torch refuses the unpadded x

    # torch pads x to a multiple of dense_min_rows itself (inside the timed call); where an
    # older torch refuses instead, the call pads x here (also timed) and says so.
    batch_notes = {m: f"torch pads x to {-(-m // min_rows) * min_rows} rows" for m in case.batches if m % min_rows}

    def call(b, x):
        m = x.shape[0]
        if m in pad_rows:
            return F.linear(F.pad(x, (0, 0, 0, pad_rows[m] - m)), b)[:m]
        try:
            return F.linear(x, b)
        except (RuntimeError, ValueError, NotImplementedError):
            if torch.cuda.is_current_stream_capturing():
                raise
            pad_rows[m] = -(-m // max(min_rows, 8)) * max(min_rows, 8)
            batch_notes[m] = f"x padded to {pad_rows[m]} rows (torch refused {m})"
            return F.linear(F.pad(x, (0, 0, 0, pad_rows[m] - m)), b)[:m]

    prep = Prepared(sw, call, _tensor_bytes(sw.packed, sw.meta), lambda _: to_sparse_semi_structured(case.w),
                    note=backend, info={"backend": backend, "dense_min_rows": min_rows}, batch_notes=batch_notes)
    return prep


def _prep_sparse_matmul(case: Case) -> Prepared:
    try:
        from rarefy.kernels.sparse_matmul import sparse_matmul
    except ImportError as e:
        raise Unavailable(f"rarefy.kernels.sparse_matmul not importable yet ({e})") from None
    if case.sw is None:
        raise Unsupported(f"no {case.pattern.format} format for this weight")
    return Prepared(case.sw, lambda sw, x: sparse_matmul(x, sw), case.sw.nbytes, _clone_sparse_weight,
                    note=case.pattern.format, info={"format": case.pattern.format})


def _prep_compiled(case: Case) -> Prepared:
    try:
        from rarefy.sparse_compiler import compile_matrix
    except ImportError as e:
        raise Unavailable(f"rarefy.sparse_compiler not importable yet ({e})") from None
    t0 = time.perf_counter()
    cm = compile_matrix(case.w, batch_sizes=tuple(case.batches), cache_dir=None, autotune=True,
                        name=f"{case.shape.name} {case.pattern.label}")
    if case.device.type == "cuda":
        torch.cuda.synchronize(case.device)
    compile_s = time.perf_counter() - t0
    fmt = getattr(getattr(cm, "plan", None), "format", "?")
    weight = getattr(cm, "weight", None)
    nbytes = int(getattr(weight, "nbytes", 0) or 0)
    report = getattr(cm, "report", None)
    return Prepared(cm, lambda cm, x: cm(x), nbytes, copy.deepcopy, note=f"{fmt}, compiled in {compile_s:.1f} s",
                    info={"format": fmt, "compile_s": compile_s, "report": report})


def gpu_methods() -> list[Method]:
    return [
        Method("dense", "cuBLAS dense", True, _prep_dense, gate=False),
        Method("rarefy_dense", "rarefy dense (Triton gemv)", True, _prep_rarefy_dense),
        Method("csr", "torch CSR (cuSPARSE)", False, _prep_csr, gate=False),
        Method("semi24", "torch 2:4 semi-structured", False, _prep_semi24,
               lambda p: p is not None and p.kind == "nm" and (p.n, p.m) == (2, 4), gate=False),
        Method("sparse_matmul", "rarefy sparse_matmul", False, _prep_sparse_matmul),
        Method("rarefy", "rarefy compile_matrix", False, _prep_compiled),
    ]


def cpu_methods(dtype: torch.dtype) -> list[Method]:
    out = [Method("dense", f"torch dense {_dt(dtype)}", True, _prep_dense, gate=False)]
    if dtype != torch.float32:
        out.append(Method("dense_fp32", "torch dense fp32", True, _prep_dense_fp32, gate=False))
    out.append(Method("rarefy_dense", "rarefy dense (gemv_f16)", True, _prep_rarefy_dense))
    out.append(Method("csr", f"torch CSR {_dt(dtype)}", False, _prep_csr, gate=False))
    if dtype != torch.float32:
        out.append(Method("csr_fp32", "torch CSR fp32", False, lambda c: _prep_csr(c, torch.float32), gate=False))
    out += [Method("sparse_matmul", "rarefy sparse_matmul", False, _prep_sparse_matmul),
            Method("rarefy", "rarefy compile_matrix", False, _prep_compiled)]
    return out


def _dt(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


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


def _cpu_cache_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            v = f.read().strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(v[-1], 1)
        return int(v.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 * 2**20


def cpu_time_us(launch, nbuf: int, samples: int = 5, sample_s: float = 0.01) -> float:
    """Median µs per call of back-to-back ``launch(i)`` calls cycling over `nbuf` copies.

    Each timed burst lasts about `sample_s`; the copy index keeps cycling across bursts, so a
    copy is not touched again until all the others have been.
    """
    warm = min(nbuf, 8)
    t0 = time.perf_counter()
    for i in range(warm):
        launch(i)
    per = (time.perf_counter() - t0) / warm
    calls = max(1, math.ceil(sample_s / max(per, 1e-7)))
    times, j = [], warm
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            launch(j % nbuf)
            j += 1
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def cpu_copy_bandwidth_tbs(nbytes: int = 256 * 2**20, samples: int = 5) -> float:
    """memcpy bandwidth in TB/s, counting read + write."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e12


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
    if runner.cuda:
        from rarefy.bench.gpu_timing import copy_bandwidth_tbs

        runner.copy_tbs = copy_bandwidth_tbs(runner.device, cfg.copy_bytes or 2**30)
    else:
        runner.copy_tbs = cpu_copy_bandwidth_tbs(cfg.copy_bytes or 256 * 2**20)
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


# ------------------------------------------------------------------------------ summary

SUMMARY_PATTERNS = ("50", "75", "90", "2:4")


def summarize(rows: list[dict], cfg: BenchConfig) -> dict:
    """The issue's figures: medians over the Llama-3-8B shapes of the speed-up at batch 1
    (50/75/90% unstructured, 2:4) and of batch-8 speed-up / batch-1 speed-up, per method."""
    ok = [r for r in rows if r["status"] == "ok" and r["pattern_kind"] != "dense"]
    shapes = sorted({(r["n"], r["k"]) for r in ok if r["shape"].startswith(SUMMARY_PREFIX)})
    scope = f"the {len(shapes)} {SUMMARY_PREFIX} shapes"
    if not shapes:
        shapes = sorted({(r["n"], r["k"]) for r in ok})
        scope = f"all {len(shapes)} benchmarked shapes (no {SUMMARY_PREFIX} shapes in this run)"
    methods = list(dict.fromkeys(r["method"] for r in ok))
    labels = {r["method"]: r["label"] for r in ok}
    entries = []
    for key in methods:
        for spec in SUMMARY_PATTERNS:
            sel = {(r["n"], r["k"], r["batch"]): r for r in ok if r["method"] == key and r["pattern_spec"] == spec
                   and (r["n"], r["k"]) in shapes}
            if not sel:
                continue
            e = {"method": key, "label": labels[key], "pattern": spec, "shapes": 0}
            for col in ("speedup_vs_dense", "speedup_vs_rarefy_dense"):
                s1 = {s: sel[s + (1,)][col] for s in shapes if s + (1,) in sel and sel[s + (1,)][col]}
                s8 = {s: sel[s + (8,)][col] for s in shapes if s + (8,) in sel and sel[s + (8,)][col]}
                ratio = [s8[s] / s1[s] for s in s1 if s in s8]
                suffix = "" if col == "speedup_vs_dense" else "_vs_rarefy_dense"
                e["batch1" + suffix] = statistics.median(s1.values()) if s1 else None
                e["batch8" + suffix] = statistics.median(s8.values()) if s8 else None
                e["batch8_over_batch1" + suffix] = statistics.median(ratio) if ratio else None
                if col == "speedup_vs_dense":
                    e["shapes"] = len(s1)
            entries.append(e)
    return {"scope": scope, "dtype": _dt(cfg.dtype), "shapes": [f"{n}x{k}" for n, k in shapes],
            "entries": entries}


# ----------------------------------------------------------------------------- printing

_COLS = ("shape", "N x K", "pattern", "M", "method", "µs", "MB", "TB/s", "% copy", "vs dense", "vs r-dense",
         "status / note")


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _cells(r: dict, batches: str) -> list[str]:
    note = r["status"] if r["status"] != "ok" else ""
    if r["note"]:
        note = f"{note}: {r['note']}" if note else r["note"]
    if r["status"] == "ok" and r.get("timing") and r["timing"] != "cuda graph" and r["timing"] != "wall clock":
        note = f"{note}; {r['timing']}" if note else r["timing"]
    return [r["shape"], f"{r['n']}x{r['k']}", r["pattern"], batches, r["label"], _f(r["us"], ".1f"),
            _f(r["mb"], ".2f"), _f(r["tbs"], ".3f" if (r["tbs"] or 1) < 0.1 else ".2f"),
            _f(r["frac_copy_bw"] and 100 * r["frac_copy_bw"], ".0f"),
            _f(r["speedup_vs_dense"], ".2f") + ("x" if r["speedup_vs_dense"] else ""),
            _f(r["speedup_vs_rarefy_dense"], ".2f") + ("x" if r["speedup_vs_rarefy_dense"] else ""), note]


def _collapsed(rows: list[dict]) -> list[list[str]]:
    """Table cells; consecutive non-ok rows of one (shape, pattern, method) with the same note
    become one line listing their batches."""
    out, i = [], 0
    while i < len(rows):
        r, j = rows[i], i + 1
        if r["status"] != "ok":
            while (j < len(rows) and rows[j]["status"] == r["status"] and rows[j]["note"] == r["note"]
                   and all(rows[j][c] == r[c] for c in ("shape", "n", "k", "pattern", "method"))):
                j += 1
        out.append(_cells(r, ",".join(str(x["batch"]) for x in rows[i:j])))
        i = j
    return out


def format_table(result: dict) -> str:
    info, cuda = result["info"], result["config"]["device"] == "cuda"
    cols = list(_COLS)
    cols[9], cols[10] = ("vs cuBLAS", "vs Triton") if cuda else ("vs F.linear", "vs gemv_f16")
    cells = _collapsed(result["rows"])
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols[:-1])]
    right = {3, 5, 6, 7, 8, 9, 10}

    def line(vals):
        return "  ".join((v.rjust(w) if i in right else v.ljust(w)) for i, (v, w) in enumerate(zip(vals, widths))) \
            + "  " + vals[-1]

    out = [f"rarefy bench kernels: {info['device']}, {info['dtype']}, torch {info['torch']}"
           + (f", triton {info['triton']}" if info.get("triton") else "")
           + f"; copy bandwidth {info['copy_tbs']:.2f} TB/s (read + write); {info['seconds']:.0f} s",
           f"dense reference: {info['dense_reference']}; second reference: {info['rarefy_dense_reference']}",
           "", line(cols), line(["-" * w for w in widths] + ["-" * 13])]
    prev = None
    for row in cells:
        if prev is not None and row[0] != prev:
            out.append("")
        prev = row[0]
        out.append(line(row).rstrip())
    out += ["", *format_summary(result)]
    if result["notes"]:
        out += ["", "notes:"] + [f"  {k}: {v}" for k, v in result["notes"].items()]
    return "\n".join(out)


def format_summary(result: dict) -> list[str]:
    s, cuda = result["summary"], result["config"]["device"] == "cuda"
    ref, ref2 = ("cuBLAS", "Triton gemv") if cuda else ("F.linear", "gemv_f16")
    out = [f"Summary: median over {s['scope']}, {s['dtype']}; speed-up vs {ref} dense (vs rarefy's {ref2} "
           "in brackets); b8/b1 = median over shapes of (batch-8 speed-up / batch-1 speed-up)"]
    if not s["entries"]:
        return out + ["  (no timed sparse rows at the summary patterns " + ", ".join(SUMMARY_PATTERNS) + ")"]
    w = max(len(e["label"]) for e in s["entries"])
    out.append(f"  {'method':<{w}}  {'pattern':<9}{'shapes':>7}  {'batch 1':>17}  {'batch 8':>17}  {'b8/b1':>12}")
    for e in s["entries"]:
        pat = e["pattern"] if ":" in e["pattern"] else f"unstr {e['pattern']}%"

        def pair(a, b, unit="x"):
            return f"{_f(a, '.2f')}{unit if a is not None else ''} ({_f(b, '.2f')}{unit if b is not None else ''})"

        out.append(f"  {e['label']:<{w}}  {pat:<9}{e['shapes']:>7}  "
                   f"{pair(e['batch1'], e['batch1_vs_rarefy_dense']):>17}  "
                   f"{pair(e['batch8'], e['batch8_vs_rarefy_dense']):>17}  "
                   f"{pair(e['batch8_over_batch1'], e['batch8_over_batch1_vs_rarefy_dense'], ''):>12}")
    return out


def format_markdown(result: dict) -> str:
    info, cfg, cuda = result["info"], result["config"], result["config"]["device"] == "cuda"
    ref, ref2 = ("cuBLAS", "rarefy Triton") if cuda else ("F.linear", "rarefy gemv_f16")
    timing = ("CUDA-graph replay of back-to-back launches, rotating over weight copies totalling >= 4x L2 "
              f"({info['cache_bytes'] / 2**20:.0f} MiB), median of {cfg['samples']} replays; do_bench (clean L2) "
              "where a launch cannot be captured" if cuda else
              "wall clock of back-to-back calls rotating over weight copies (>= 2x the last-level cache, at most "
              f"256 copies), median of {cfg['samples']} bursts")
    out = ["# rarefy bench kernels", "",
           f"- date: {info['date']}",
           f"- device: {info['device']}" + (f" ({info.get('sms')} SMs, CUDA {info.get('cuda')})" if cuda else ""),
           f"- torch {info['torch']}, triton {info.get('triton') or 'n/a'}, python {info['python']}",
           f"- copy bandwidth: {info['copy_tbs']:.2f} TB/s (device-to-device copy, read + write)",
           f"- dtype: {info['dtype']}; weights: random normal, magnitude-pruned to the pattern",
           f"- patterns: {', '.join(cfg['patterns'])} (`b16@50`: 16x16 blocks, 50% of blocks removed)",
           f"- batches: {', '.join(map(str, cfg['batches']))}; run took {info['seconds']:.0f} s",
           f"- timing: {timing}",
           "- bytes: the weight as stored (values + metadata; rarefy: the sparse format's `nbytes`) + x + out; "
           f"% copy = achieved TB/s / copy bandwidth; speed-ups: {ref} dense time / time, {ref2} dense time / time",
           "- every row is checked first against a float64 reference (rel err < "
           f"{cfg['tol']:g}, no NaN); FAILED rows are not timed",
           f"- command: `{cfg['command'] or 'run_bench(...)'}`", "",
           "## Summary", "", "```", *format_summary(result), "```", ""]
    if result["notes"]:
        out += ["## Notes", ""] + [f"- {k}: {v}" for k, v in result["notes"].items()] + [""]
    cols = list(_COLS)
    cols[9], cols[10] = f"vs {ref}", f"vs {ref2}"
    out += ["## All rows", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in _collapsed(result["rows"]):
        out.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(out) + "\n"


def format_progress(r: dict) -> str:
    return (f"[bench] {r['shape']} {r['n']}x{r['k']} {r['pattern']} M={r['batch']} {r['label']}: "
            + (f"{r['us']:.1f} us, {r['tbs']:.2f} TB/s, x{_f(r['speedup_vs_dense'], '.2f')} vs dense"
               if r["status"] == "ok" else f"{r['status']} {r['note']}"))


def _stderr_progress(r: dict) -> None:
    print(format_progress(r), file=sys.stderr, flush=True)
