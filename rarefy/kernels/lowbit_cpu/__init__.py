"""Low-bit weight GEMV / small-batch GEMM on the CPU (C++ extension, built on first use).

Three kernels, each reading the weights in their packed form (never a dense copy):

    ternary_gemv_cpu(x, packed, scale, group_size=None)   ternary, rarefy layout v1 (2 bits)
    int8_gemv_cpu(x, qweight, scale, group_size=None)     weight-only int8
    gguf_gemv_cpu(x, blocks, qtype, shape)                GGUF Q4_0 / Q4_1 / Q8_0 raw bytes

x is float32 ``[M, K]`` (or ``[..., K]``; made for M = 1..16), y float32 ``[M, N]``.
All three quantize the activations once per call and run integer dot products (AVX-512 VNNI
``vpdpbusd``; AVX2 ``vpmaddubsw``; portable C++), unpacking weights in registers; rows of W
are spread over torch's threads. Activation modes (``act_quant``):

- ``None`` (ternary, int8): 16-bit fixed point per row, as two int8 planes
  ``x ~ (q1 + q2/254) * amax/127``; error <= amax/64516 per element (finer than bf16 for
  every element above amax/128). Two dot products per weight byte, one weight read.
- ``"int8"`` (ternary, int8): BitNet b1.58's per-token absmax int8, the same numbers as
  ``fake_quant_int8_per_token`` (W1.58A8 / W8A8). Half the work of ``None``.
- GGUF: the same two modes per block of 32 activations (fp32 block scales): None = 16-bit
  (two planes), "int8" = llama.cpp's Q8 scheme.

A row of x holding NaN/inf gives a NaN row of y. Results do not depend on the thread count.
Design, measurements and the alternatives tried: docs/lowbit-kernels.md (CPU part).
Bad arguments raise ``RarefyError``; a machine without a compiler raises RuntimeError on
the first call (``available()`` says so without raising).
"""

from __future__ import annotations

import os

import torch

from rarefy.errors import RarefyError
from rarefy.formats import gguf_blocks
from rarefy.kernels.cpp_op import CppOp

from .ref import gguf_gemv_ref, int8_gemv_ref, ternary_gemv_ref

__all__ = ["ternary_gemv_cpu", "int8_gemv_cpu", "gguf_gemv_cpu", "ternary_gemv_ref", "int8_gemv_ref",
           "gguf_gemv_ref", "available", "warm_up", "build_seconds", "best_isa", "ISA_NAMES", "QTYPES"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lowbit_gemv.cpp")
_NAME = "rarefy_lowbit_gemv"
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}
QTYPES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
_ACT = {None: 0, "int8": 1}

def _rows_of_weight(x, w, *rest):  # shape-only kernels for torch.compile: float32 [..., N]
    return x.new_empty(tuple(x.shape[:-1]) + (w.shape[0],))


def _rows_given(x, blocks, qtype, n, k, act, bias, isa):
    return x.new_empty(tuple(x.shape[:-1]) + (n,))


_ext = CppOp(_NAME, _SRC, "rarefy_lowbit", "ternary_gemv", "rarefy.kernels.lowbit_cpu",
             fakes={"ternary_gemv": _rows_of_weight, "int8_gemv": _rows_of_weight, "gguf_gemv": _rows_given})
_state = _ext.state

# available(): builds/loads on this machine (never raises; logs why not, once); warm_up(): the
# same, now; build_seconds(): how long the first load took; best_isa(): fastest path on this
# CPU: 2 = AVX-512 (F/BW/VL/DQ/VNNI/VBMI), 1 = AVX2 (+FMA/F16C/BMI2), 0 = portable C++.
available = warm_up = _ext.available
build_seconds = _ext.build_seconds
best_isa = _ext.best_isa


_OPS: tuple | None = None


def _load_ops() -> tuple:
    global _OPS
    _ext.require()
    ns = torch.ops.rarefy_lowbit
    _OPS = (ns.ternary_gemv.default, ns.int8_gemv.default, ns.gguf_gemv.default)
    return _OPS


# The calls go straight to the C++ op (a decode step makes ~200 of them; Python-side checks
# cost ~10 us each). Only when the op refuses its arguments do the checks below run, to turn
# the refusal into a RarefyError that names the problem.
def _check_x(x, fn: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    if not isinstance(x, torch.Tensor):
        raise RarefyError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise RarefyError(f"{fn}: x must be on the CPU, got {x.device}")
    if x.dtype != torch.float32:
        raise RarefyError(f"{fn}: x must be float32, got {x.dtype}")
    if x.dim() < 1:
        raise RarefyError(f"{fn}: x must be [M, K] (or [..., K]), got a scalar")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    return (x2 if x2.is_contiguous() else x2.contiguous()), lead


def _check_weight(w, dtype: torch.dtype, what: str, fn: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise RarefyError(f"{fn}: {what} must be a torch.Tensor, got {type(w).__name__}")
    if w.device.type != "cpu":
        raise RarefyError(f"{fn}: {what} must be on the CPU, got {w.device}")
    if w.dtype != dtype:
        raise RarefyError(f"{fn}: {what} must be {dtype}, got {w.dtype}")
    if w.dim() != 2:
        raise RarefyError(f"{fn}: {what} must be 2-D, got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        raise RarefyError(f"{fn}: {what} must be contiguous (it is not copied per call)")


def _check_scale(scale, want: tuple[int, int], what: str, fn: str) -> None:
    if not isinstance(scale, torch.Tensor):
        raise RarefyError(f"{fn}: scale must be a torch.Tensor, got {type(scale).__name__}")
    if scale.device.type != "cpu" or scale.dtype not in (torch.float32, torch.float16):
        raise RarefyError(f"{fn}: scale must be a float32 or float16 CPU tensor, got {scale.dtype} on {scale.device}")
    if tuple(scale.shape) != want:
        raise RarefyError(f"{fn}: {what} scale must have shape {list(want)}, got {list(scale.shape)}")
    if not scale.is_contiguous():
        raise RarefyError(f"{fn}: scale must be contiguous")


def _check_group(group_size, k: int, multiple: int, fn: str) -> int:
    if group_size is None:
        return 0
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise RarefyError(f"{fn}: group_size must be a positive int or None, got {group_size!r}")
    if k % group_size:
        raise RarefyError(f"{fn}: group_size {group_size} does not divide the in-features {k}")
    if group_size % multiple:
        raise RarefyError(f"{fn}: group_size {group_size} is not a multiple of {multiple}")
    return group_size


def _check_bias(bias, n: int, fn: str) -> None:
    if bias is None:
        return
    if (not isinstance(bias, torch.Tensor) or bias.device.type != "cpu" or bias.dtype != torch.float32
            or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise RarefyError(f"{fn}: bias must be a contiguous float32 CPU tensor of shape [{n}]")


def _act(act_quant, fn: str) -> int:
    if act_quant not in _ACT:
        raise RarefyError(f"{fn}: act_quant must be None or 'int8', got {act_quant!r}")
    return _ACT[act_quant]


def _isa(isa, fn: str) -> int:
    if isinstance(isa, bool) or not isinstance(isa, int):
        raise RarefyError(f"{fn}: isa must be an int, got {isa!r}")
    if isa != -1:
        best = best_isa()
        if not 0 <= isa <= best:
            raise RarefyError(f"{fn}: code path {isa} is not available on this CPU (paths: "
                              + ", ".join(f"{i} = {ISA_NAMES[i]}" for i in range(best + 1)) + ")")
    return isa


def ternary_gemv_cpu(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int | None = None, *,
                     act_quant: str | None = None, bias: torch.Tensor | None = None, isa: int = -1) -> torch.Tensor:
    """``y = x @ (Q * s).T (+ bias)`` for ternary weights in layout v1.

    Args:
        x: float32 ``[M, K]`` or ``[..., K]``, CPU. K is the weight's in-features (any K; the
            packed rows hold ``ceil(K/4)`` bytes, padding codes are value 0).
        packed: uint8 ``[N, ceil(K/4)]``, contiguous (``rarefy.lowbit.ternary.pack_ternary``).
        scale: float32/float16, ``[1, 1]`` per tensor or ``[N, K // group_size]`` per group.
        group_size: None (per tensor) or a multiple of 4 dividing K. Multiples of 16 run the
            vector paths; others run the portable path.
        act_quant: None (16-bit fixed-point activations) or "int8" (BitNet's W1.58A8).
        bias: optional float32 ``[N]``.
        isa: -1 best; 0 portable, 1 AVX2, 2 AVX-512 to force one (tests).

    Returns float32 ``[..., N]``. Codes 0b11 (never written; ``check_codes`` refuses them at
    load) are not checked here and read as +2.
    """
    ops = _OPS or _load_ops()
    try:
        return ops[0](x, packed, scale, -1 if group_size is None else group_size, _ACT[act_quant], bias, isa)
    except Exception as e:
        _diagnose_ternary(x, packed, scale, group_size, act_quant, bias, isa)
        raise RarefyError(f"ternary_gemv_cpu: {e}") from e


def _diagnose_ternary(x, packed, scale, group_size, act_quant, bias, isa) -> None:
    fn = "ternary_gemv_cpu"
    x2, _ = _check_x(x, fn)
    k = x2.shape[1]
    _check_weight(packed, torch.uint8, "packed", fn)
    n = packed.shape[0]
    if packed.shape[1] != (k + 3) // 4:
        raise RarefyError(f"{fn}: packed has {packed.shape[1]} bytes per row; K = {k} needs {(k + 3) // 4}")
    g = _check_group(group_size, k, 4, fn)
    _check_scale(scale, (n, k // g) if g else (1, 1), "per-group" if g else "per-tensor", fn)
    _check_bias(bias, n, fn)
    _act(act_quant, fn)
    _isa(isa, fn)


def int8_gemv_cpu(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, group_size: int | None = None, *,
                  act_quant: str | None = None, bias: torch.Tensor | None = None, isa: int = -1) -> torch.Tensor:
    """``y = x @ (Q * s).T (+ bias)`` for weight-only int8 (``rarefy.lowbit.int8`` layout).

    Args:
        x: float32 ``[M, K]`` or ``[..., K]``, CPU.
        qweight: int8 ``[N, K]``, contiguous.
        scale: float32/float16 ``[N, 1]`` per output channel or ``[N, K // group_size]``.
        group_size: None or a divisor of K (multiples of 4 run the vector paths).
        act_quant, bias, isa: as ``ternary_gemv_cpu``.
    """
    ops = _OPS or _load_ops()
    try:
        return ops[1](x, qweight, scale, -1 if group_size is None else group_size, _ACT[act_quant], bias, isa)
    except Exception as e:
        _diagnose_int8(x, qweight, scale, group_size, act_quant, bias, isa)
        raise RarefyError(f"int8_gemv_cpu: {e}") from e


def _diagnose_int8(x, qweight, scale, group_size, act_quant, bias, isa) -> None:
    fn = "int8_gemv_cpu"
    x2, _ = _check_x(x, fn)
    k = x2.shape[1]
    _check_weight(qweight, torch.int8, "qweight", fn)
    n = qweight.shape[0]
    if qweight.shape[1] != k:
        raise RarefyError(f"{fn}: qweight has {qweight.shape[1]} columns, x has {k}")
    g = _check_group(group_size, k, 1, fn)
    _check_scale(scale, (n, k // g) if g else (n, 1), "per-group" if g else "per-channel", fn)
    _check_bias(bias, n, fn)
    _act(act_quant, fn)
    _isa(isa, fn)


def gguf_gemv_cpu(x: torch.Tensor, blocks: torch.Tensor, qtype: str, shape, *, act_quant: str | None = None,
                  bias: torch.Tensor | None = None, isa: int = -1) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with W the GGUF tensor given by its raw bytes.

    Args:
        x: float32 ``[M, K]`` or ``[..., K]``, CPU.
        blocks: uint8, the tensor's bytes as in the file (any shape, contiguous;
            ``rarefy.formats.gguf_blocks.from_reader_tensor`` reads them).
        qtype: "Q4_0", "Q4_1" or "Q8_0".
        shape: ``(N, K)`` = (out_features, in_features), HF order (GGUF's ``ne`` reversed);
            K a multiple of 32.

        act_quant: None: activations per block of 32 in 16-bit fixed point (two int8 planes,
            ``x ~ (q1 + q2/254) amax_b/127``; perplexity equals the dequantized model's);
            "int8": llama.cpp's Q8 scheme (``q = round(x * 127/amax_b)``), half the arithmetic.
    """
    ops = _OPS or _load_ops()
    try:
        n, k = shape
        return ops[2](x, blocks, QTYPES[qtype], n, k, _ACT[act_quant], bias, isa)
    except Exception as e:
        _diagnose_gguf(x, blocks, qtype, shape, act_quant, bias, isa)
        raise RarefyError(f"gguf_gemv_cpu: {e}") from e


def _diagnose_gguf(x, blocks, qtype, shape, act_quant, bias, isa) -> None:
    fn = "gguf_gemv_cpu"
    x2, _ = _check_x(x, fn)
    if qtype not in QTYPES:
        raise RarefyError(f"{fn}: unsupported GGUF block type {qtype!r} (supported: {', '.join(QTYPES)})")
    n, k = gguf_blocks.check_shape(qtype, shape)
    if x2.shape[1] != k:
        raise RarefyError(f"{fn}: x has {x2.shape[1]} columns, the {qtype} tensor {k}")
    if not isinstance(blocks, torch.Tensor) or blocks.device.type != "cpu":
        raise RarefyError(f"{fn}: blocks must be a CPU torch.Tensor")
    gguf_blocks.check_blocks(blocks, qtype, (n, k))
    if not blocks.is_contiguous():
        raise RarefyError(f"{fn}: blocks must be contiguous")
    _check_bias(bias, n, fn)
    _act(act_quant, fn)
    _isa(isa, fn)


def bytes_per_weight(kind: str) -> float:
    """Storage per weight (scales included for GGUF; ternary/int8 scales excluded)."""
    table = {"ternary": 0.25, "int8": 1.0, **{q: gguf_blocks.QTYPES[q].nbytes / 32 for q in QTYPES}}
    return table[kind]

