"""SparseLinear: a pruned projection run by the sparse compiler's chosen kernel.

``use_sparse_weights(model)`` compiles every projection whose weight is sparse enough
(rarefy.sparse_compiler.compile_matrix: format, config and schedule per matrix, autotuned
on this device and cached on disk) and swaps in a SparseLinear where the measured sparse
kernel beats the dense one; where it does not, the dense layer stays (per-layer fallback).
On CUDA the q/k/v and gate/up projections are fused first, so each fused matrix is
compiled as one. The load path calls it for checkpoints written by ``rarefy prune``.

A SparseLinear can also hold a weight format directly, without the compiler: an
``Int8TiledBitmap`` (sparse + int8: int8 values in the bitmap layout, one fp32 scale per
output row) runs through ``sparse_matmul`` (the C++ kernel on CPU, triton_bitmap_int8 on
CUDA); checkpoints written by ``rarefy quantize --to int8`` from a pruned model load so.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from rarefy.layers.half_weight_linear import HalfWeightLinear
from rarefy.layers.linear import DenseLinear

# CUDA batches above this many rows run a dense GEMM on the rebuilt weight (as the compiler's
# CompiledMatrix does for prefill): the decode kernels are not built for them.
PREFILL_ROWS = 64

# Below this fraction of zeros no format saves enough bytes to pay for its metadata.
MIN_SPARSITY = 0.25


# torch.compile must not trace into the Triton launches (inductor recompiles user kernels
# and cannot build their libdevice calls): each SparseLinear's matmul is one opaque custom
# op, found through this registry by an integer key (a constant for the compiler).
_REGISTRY: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # freed with its layer


@torch.library.custom_op("rarefy::sparse_linear", mutates_args=())
def _sparse_linear_op(x: torch.Tensor, key: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _REGISTRY[key](x, bias)


@_sparse_linear_op.register_fake
def _(x, key, bias):
    return x.new_empty(*x.shape[:-1], _REGISTRY[key].shape[0])


class _Plan:
    def __init__(self, fmt: str):
        self.format, self.param = fmt, ""


class _Stats:
    def __init__(self, density: float):
        self.density = density


class DirectWeight:
    """A sparse weight format used as is (no compiler plan): callable like CompiledMatrix."""

    def __init__(self, weight, config=None):
        from rarefy.formats.sparse_weight import Int8TiledBitmap
        self.weight, self.config = weight, config
        self.shape = tuple(weight.shape)
        self.plan = _Plan("bitmap-int8" if isinstance(weight, Int8TiledBitmap) else type(weight).__name__)
        self.stats = _Stats(weight.nnz / max(1, self.shape[0] * self.shape[1]))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from rarefy.kernels.sparse_matmul import sparse_matmul
        if x.is_cuda and x.numel() // max(1, x.shape[-1]) > PREFILL_ROWS:
            return torch.nn.functional.linear(x, self.weight.to_dense(x.dtype), bias)
        return sparse_matmul(x, self.weight, bias, config=self.config)


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W held by a CompiledMatrix (TiledBitmap / NMSparse / BlockSparse),
    or by a weight format given directly (e.g. Int8TiledBitmap; wrapped in DirectWeight)."""

    def __init__(self, compiled, bias: torch.Tensor | None):
        super().__init__()
        from rarefy.formats.sparse_weight import _SparseWeight
        if isinstance(compiled, _SparseWeight):
            compiled = DirectWeight(compiled)
        self.compiled = compiled
        self.out_features, self.in_features = compiled.shape
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._key = id(compiled)
        _REGISTRY[self._key] = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch.ops.rarefy.sparse_linear(x, self._key, self.bias)
        if x.dtype == torch.float32:
            return self.compiled(x, self.bias)
        return self.compiled(x.float(), None if self.bias is None else self.bias.float()).to(x.dtype)

    def extra_repr(self) -> str:
        p = self.compiled.plan
        return (f"in={self.in_features}, out={self.out_features}, format={p.format}{p.param}, "
                f"density={self.compiled.stats.density:.3f}")


def weight_sparsity(w: torch.Tensor) -> float:
    return 1.0 - float((w != 0).sum()) / max(1, w.numel())


def use_sparse_weights(model: nn.Module, batch_sizes=(1,), autotune: bool = True, cache_dir=None,
                       min_sparsity: float = MIN_SPARSITY, progress: bool = False) -> list[dict]:
    """Swap sparse-enough projections for SparseLinear; returns one report dict per compiled matrix
    (those that stayed dense included, with ``"kept": "dense"``)."""
    from rarefy.sparse_compiler import compile_matrix

    if next(model.parameters()).is_cuda and hasattr(model, "fuse_projections"):
        model.fuse_projections()
    todo = [(n, m) for n, m in model.named_modules()
            if isinstance(m, (DenseLinear, HalfWeightLinear)) and weight_sparsity(m.weight) >= min_sparsity]
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="compiling sparse layers", unit="matrix", leave=False)
    reports: list[dict] = []
    chosen: dict[str, nn.Module] = {}
    for name, mod in todo:
        cm = compile_matrix(mod.weight.detach(), batch_sizes=batch_sizes, cache_dir=cache_dir,
                            autotune=autotune, name=name)
        rep = cm.report
        if cm.plan.format != "dense":
            chosen[name] = SparseLinear(cm, None if mod.bias is None else mod.bias.detach())
        else:
            rep["kept"] = "dense"
        reports.append(rep)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    for name, new in chosen.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return reports
