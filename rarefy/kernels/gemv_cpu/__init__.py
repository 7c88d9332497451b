"""fp16-weight GEMV for CPU decode (C++ extension, built on first use).

Batch-1 decode on a CPU is bound by the bytes of weight streamed from DRAM. torch's bf16/fp16
matmuls on CPU take as long as fp32 ones, so they do not cash in on the halved bytes. This
kernel keeps the weight in fp16 (half the bytes of fp32, 8x finer rounding than bf16), widens
it to fp32 in registers and accumulates in fp32 (AVX-512F / AVX2+F16C / scalar, picked at
run time), parallel over output features with torch's thread pool.

The C++ source is compiled once with ``torch.utils.cpp_extension.load`` and cached in torch's
extensions directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later
processes only load the cached library. It is registered as ``torch.ops.rarefy_gemv.gemv_f16``.

    from rarefy.kernels.gemv_cpu import available, gemv_f16
    if available():
        y = gemv_f16(x, w16, bias)      # x fp32 [..., K], w16 fp16 [N, K] -> fp32 [..., N]
"""

from __future__ import annotations

import os

import torch

from rarefy.kernels.cpp_op import CppOp

from .ref import gemv_f16_ref

__all__ = ["gemv_f16", "gemv_f16_ref", "available", "warm_up", "build_seconds", "best_isa", "ISA_NAMES"]


_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv_f16.cpp")
_NAME = "rarefy_gemv_f16"
ISA_NAMES = {0: "scalar", 1: "avx2+f16c", 2: "avx512f"}

_ext = CppOp(_NAME, _SRC, "rarefy_gemv", "gemv_f16", "rarefy.kernels.gemv_cpu",
             fakes={"gemv_f16": lambda x, w, bias=None, isa=-1: x.new_empty(tuple(x.shape[:-1]) + (w.shape[0],))})
_state = _ext.state  # tried / op / error / seconds


# available(): builds/loads on this machine (never raises; logs why not, once);
# warm_up(): the same, now rather than on the first call; build_seconds(): how long the
# first load took; best_isa(): Fastest code path on this CPU: 2 = AVX-512F, 1 = AVX2+FMA+F16C, 0 = scalar.
_load = _ext.load
available = warm_up = _ext.available
build_seconds = _ext.build_seconds
best_isa = _ext.best_isa


def gemv_f16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, isa: int = -1) -> torch.Tensor:
    """``y = x @ w.float().T (+ bias)`` with fp16 weights and fp32 math.

    Args:
        x: float32, shape ``[..., K]``, CPU. Any strides (copied to contiguous if needed).
        w: float16 (``torch.half``), shape ``[N, K]`` (``nn.Linear.weight`` layout), CPU,
            contiguous (not copied: a weight copy per call would defeat the point).
        bias: optional float32 ``[N]``, CPU, contiguous.
        isa: code path; -1 picks the best (see ``best_isa``). Lower values force the
            AVX2 (1) or scalar (0) path, for tests.

    Returns:
        float32 tensor of shape ``[..., N]`` (newly allocated).

    Made for small M (number of rows of x, 1..8): each weight row is read from memory once
    per call and reused from L1 for all rows of x, in tiles of 4. For large M (prefill) a
    GEMM such as ``F.linear`` on fp32 weights is faster.

    Raises RuntimeError if the extension is unavailable; TypeError/ValueError on bad dtypes,
    shapes or layouts. Not differentiable (inference only).
    """
    op = _ext.require()
    # The op takes x [..., K] contiguous and returns [..., N]: no reshapes here (decode calls
    # this per layer per token, and Python-side tensor ops cost microseconds each).
    return op(x if x.is_contiguous() else x.contiguous(), w, bias, isa)
