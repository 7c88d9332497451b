"""Input-sparse GEMV / small-batch GEMM for CPU: activation sparsity, TEAL-style (C++, built on first use).

``y = (x * (|x| >= threshold)) @ wt + bias`` with the weight stored TRANSPOSED, ``wt`` [K, N]
(row i = input channel i), fp16 (main), bf16 or fp32, fp32 math. The mask is computed inside
the kernel: one pass over x compacts the channels active for at least one token (the union over
the batch; each token still uses its own masked values), then only those rows of ``wt`` are
read, each as one contiguous stream. Batch-1 decode is bound by the weight bytes read, so at
density d (fraction of active channels) the call takes about d of a dense fp16 GEMV's time.

Columns are split over threads (each owns a contiguous stripe of y, no atomics), or, for
narrow layers at small M, the active rows (K split: two fixed halves of the active list, each
streamed as whole rows into its own fp32 partial, summed in a fixed order); per thread
the active rows are streamed in groups of 16 into a register tile of up to 8 tokens x 128
columns, with software prefetch ahead (AVX-512 / AVX2+F16C / scalar, picked at run time).
Design notes in input_sparse.cpp; measurements in docs/results/activation-cpu-gemv.md.

When to fall back to dense: above ``dense_crossover(m)`` (density of the union of the
batch's masks) rarefy's dense fp16 GEMV (``rarefy.kernels.gemv_cpu.gemv_f16`` on the
untransposed weight) is as fast or faster. With independent random masks the union of a batch
is much denser than one token's (50% per token -> 94% for 4 tokens); ``union_density`` measures
it in one pass over x.

    from rarefy.kernels.activation_cpu import available, input_sparse_matmul_cpu
    if available():
        y = input_sparse_matmul_cpu(x, wt, threshold, bias)   # x fp32 [M, K], wt [K, N] -> fp32 [M, N]

Compiled once with ``torch.utils.cpp_extension.load`` and cached in torch's extensions
directory; registered as ``torch.ops.rarefy_actsparse.input_sparse_matmul``.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from rarefy.kernels.cpp_op import CppOp

from .ref import active_mask, input_sparse_matmul_cpu_ref

__all__ = ["available", "input_sparse_matmul_cpu", "input_sparse_matmul_cpu_ref", "active_mask", "union_density",
           "dense_crossover", "use_sparse", "DENSE_CROSSOVER", "warm_up", "build_seconds", "best_isa", "ISA_NAMES"]


_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "input_sparse.cpp")
_NAME = "rarefy_actsparse"
ISA_NAMES = {0: "scalar", 1: "avx2+f16c", 2: "avx512"}
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

def _fake_matmul(x, wt, threshold, bias=None, isa=-1, group=0, pf=-1, ksplit=-1):
    # shape-only: lets torch.compile keep the op opaque inside a compiled decode step
    return x.new_empty(x.shape[0], wt.shape[1], dtype=torch.float32)


_ext = CppOp(_NAME, _SRC, "rarefy_actsparse", "input_sparse_matmul", "rarefy.kernels.activation_cpu",
             fakes={"input_sparse_matmul": _fake_matmul})
_state = _ext.state  # tried / op / error / seconds

# available(): builds/loads on this machine (never raises; logs why not, once);
# warm_up(): the same, now rather than on the first call; build_seconds(): how long the
# first load took; best_isa(): Fastest code path on this CPU: 2 = AVX-512 (F/BW/VL/DQ), 1 = AVX2+FMA+F16C, 0 = scalar.
_load = _ext.load
available = warm_up = _ext.available
build_seconds = _ext.build_seconds
best_isa = _ext.best_isa


# Density of the union mask (fraction of input channels read) above which the dense fp16
# GEMV can be faster, by batch size M (keys: the smallest M each value applies to). Measured
# on the SmolLM2-135M layer shapes and 4096 x 4096, fp16 weights, hot and streaming from DRAM
# (docs/results/activation-cpu-gemv.md: 1 thread, CPU time, on a loaded shared machine). The
# per-shape crossovers were 0.82-0.96 or "never slower" at M = 1 and 0.65-0.99 at M = 4; these
# are the conservative values (the small 576x192 layer crosses first: fixed ~3 µs per call).
DENSE_CROSSOVER = {1: 0.80, 2: 0.70}


def dense_crossover(m: int = 1) -> float:
    """Union density above which a caller should use the dense fp16 GEMV instead (batch m)."""
    if m < 1:
        raise ValueError(f"dense_crossover: m must be >= 1, got {m}")
    return DENSE_CROSSOVER[max(k for k in DENSE_CROSSOVER if k <= m)]


def union_density(x: torch.Tensor, threshold: float) -> float:
    """Fraction of the K input channels with ``|x[m, i]| >= threshold`` for some token m.

    One pass over x in C++ (``x``: contiguous float32 [M, K]); NaN never counts as active.
    """
    op_ok = available()
    t = _check_threshold(threshold)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"union_density: x must be [M, K] with K > 0, got shape {tuple(x.shape)}")
    if op_ok and x.dtype == torch.float32 and not x.is_cuda:
        return torch.ops.rarefy_actsparse.count_active(x.contiguous(), t) / x.shape[1]
    return active_mask(x, t).double().mean().item()


def use_sparse(x: torch.Tensor, threshold: float) -> bool:
    """True if ``input_sparse_matmul_cpu`` is expected to beat the dense fp16 GEMV for this x."""
    return union_density(x, threshold) <= dense_crossover(max(1, x.shape[0]))


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    t = float(threshold)
    if math.isnan(t) or t < 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    return t


def input_sparse_matmul_cpu(x: torch.Tensor, wt: torch.Tensor, threshold: float,
                            bias: torch.Tensor | None = None, *, isa: int = -1,
                            ksplit: int = -1) -> torch.Tensor:
    """``y = (x * (|x| >= threshold)) @ wt (+ bias)``, reading only the active rows of ``wt``.

    Args:
        x: float32 ``[M, K]`` on CPU (M = tokens, made for 1..64; any M works). A
            non-contiguous x is copied (it is small); NaN entries never pass the threshold.
        wt: the weight TRANSPOSED, ``[K, N]`` (``linear.weight.t().contiguous()``), float16,
            bfloat16 or float32, contiguous (never copied: a weight copy per call would defeat
            the point; a transposed view such as ``linear.weight.t()`` is refused).
        threshold: python number >= 0; channel i of token m is active if ``|x[m, i]| >= t``.
            0 keeps every (non-NaN) entry; a huge value keeps none (y = bias).
        bias: optional float32 ``[N]``, contiguous.
        isa: code path; -1 picks the best (``best_isa``); 0 forces scalar, 1 AVX2 (for tests).
        ksplit: -1 picks the work split (K split for M <= 16 and rows of <= 16 KiB, else
            columns), 0 forces the column split, 1 the K split (for tests and benchmarks).

    Returns:
        float32 ``[M, N]``, newly allocated.

    Raises ValueError on bad dtypes, shapes, layouts, devices or threshold; RuntimeError if
    the extension is unavailable. Inference only (no autograd).
    """
    # Called per layer per token: the common case takes ~0.2 µs of Python here.
    if not isinstance(x, torch.Tensor) or not isinstance(wt, torch.Tensor):
        raise ValueError("input_sparse_matmul_cpu: x and wt must be tensors")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError("input_sparse_matmul_cpu: bias must be a tensor or None")
    t = threshold if type(threshold) is float and threshold >= 0.0 else _check_threshold(threshold)
    op = _state["op"] or _ext.require()
    if not x.is_contiguous():
        x = x.contiguous()
    if isa == -1 and ksplit == -1:
        return op(x, wt, t, bias)
    return op(x, wt, t, bias, isa, 0, -1, ksplit)
