"""Plain PyTorch reference for the skinny GEMM ``out = x @ w.T + bias``.

Used by the tests and the benchmark to check the Triton kernel. It is slow on
purpose: everything is upcast (float64 by default) so its own rounding error is
far below the tolerances the fast kernels are held to.
"""

from __future__ import annotations

import torch


def gemv_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference ``out[m, n] = sum_k x[m, k] * w[n, k] + bias[n]``.

    Args:
        x: ``[M, K]`` activations, any float dtype, any strides.
        w: ``[N, K]`` weight in ``nn.Linear`` layout (row ``n`` holds the ``K``
            input weights of output ``n``), any float dtype, any strides.
        bias: optional ``[N]``.
        out_dtype: dtype of the result; defaults to ``x.dtype``. Pass
            ``torch.float64`` to compare against the unrounded result.
        compute_dtype: dtype the product is computed in (``float64`` by
            default, ``float32`` is enough for bf16/fp16 checks and faster on
            GPUs with little float64 throughput).

    Returns:
        ``[M, N]`` tensor on ``x.device`` in ``out_dtype``.
    """
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"gemv_ref expects x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"inner dimensions differ: x {tuple(x.shape)} vs w {tuple(w.shape)}")
    out = x.to(compute_dtype) @ w.to(compute_dtype).t()
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias must be [{w.shape[0]}], got {tuple(bias.shape)}")
        out = out + bias.to(compute_dtype)
    return out.to(out_dtype if out_dtype is not None else x.dtype)
