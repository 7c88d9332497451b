"""`rarefy bench kernels`: the methods (dense, torch.sparse and rarefy kernels) and how each is
made ready for one case: Case, Prepared, Method, the _prep_* functions, gpu_methods, cpu_methods."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .kernel_cases import BenchPattern, Shape

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
