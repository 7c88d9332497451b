"""Paged KV-cache kernels: quantize-on-write store and flash-decoding attention.

Layout and dtypes: docs/kv-cache.md (the contract); design and measurements:
docs/attention-kernels.md.

Public API
----------
``store_kv(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale, kv_dtype)``
    k, v: ``[N, num_kv_heads, head_dim]``; token i goes to slot ``slot_mapping[i]``
    (negative: skipped). Quantized dtypes store ``rarefy.kv.quant.quantize``'s values and
    float16 scales bit for bit. CUDA → Triton (one program per token × head); CPU → torch.

``paged_decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens,
kv_dtype, sm_scale=None, num_splits=None, max_seq_len=None) -> [B, num_heads, head_dim]``
    One query token per sequence, GQA by ``num_heads // num_kv_heads``, output in q's dtype
    (bf16, fp16 or fp32). A sequence of length 0 gives zeros. CUDA → Triton flash-decoding
    launched as :func:`plan_decode` says; CPU → torch (float32 math).
    ``max_seq_len`` (the longest ``seq_lens`` entry, or any upper bound) sizes the plan; if
    it is not given, a CUDA call reads ``seq_lens.max()`` (one host synchronisation, which
    also validates the lengths against the block table) unless a CUDA graph is being
    captured, in which case the table's capacity is used. Pass it in a decode loop.

``plan_decode(...) -> DecodePlan``: the Triton launch (``plan.py``).
``paged_decode_attention_ref``: float64 reference (``ref.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Optional

import torch

from rarefy.errors import RarefyError
from rarefy.kernels.paged_attention.plan import DecodePlan, plan_decode
from rarefy.kernels.paged_attention.ref import paged_decode_attention_ref
from rarefy.kernels.paged_attention.torch_decode import paged_decode_attention_torch, store_kv_torch
from rarefy.kv.quant import SCALE_DTYPE, check_kv_dtype, is_quantized, storage_dtype

__all__ = ["DecodePlan", "plan_decode", "paged_decode_attention", "paged_decode_attention_ref", "store_kv",
           "triton_available"]

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def triton_available() -> bool:
    try:
        return _HAS_TRITON and torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


@functools.lru_cache(maxsize=None)
def _decode_impl():
    from rarefy.kernels.paged_attention.triton_decode import paged_decode_attention_triton
    return paged_decode_attention_triton


@functools.lru_cache(maxsize=None)
def _store_impl():
    from rarefy.kernels.paged_attention.triton_store import store_kv_triton
    return store_kv_triton


# Custom ops, so torch.compile treats the launchers as opaque calls.
@torch.library.custom_op("rarefy::paged_decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
               v_scale: Optional[torch.Tensor], block_tables: torch.Tensor, seq_lens: torch.Tensor, kv_dtype: str,
               sm_scale: float, num_splits: int, max_seq_len: int) -> torch.Tensor:
    return _decode_impl()(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype, sm_scale,
                          num_splits or None, max_seq_len if max_seq_len >= 0 else None)


@_decode_op.register_fake
def _(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype, sm_scale, num_splits, max_seq_len):
    return torch.empty_like(q)


@torch.library.custom_op("rarefy::store_kv", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _store_op(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
              kv_dtype: str) -> None:
    _store_impl()(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale, kv_dtype)


@_store_op.register_fake
def _(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale, kv_dtype):
    return None


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if isinstance(t, torch.Tensor) else repr(t)


def _check_cache(k_cache, v_cache, k_scale, v_scale, kv_dtype, device) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor) or c.dim() != 4:
            raise RarefyError(f"{name} must be [num_blocks, num_kv_heads, block_size, head_dim], got {_shape(c)}")
        if c.dtype != storage_dtype(kv_dtype):
            raise RarefyError(f"{name} is {c.dtype}, but kv_dtype {kv_dtype!r} is stored as {storage_dtype(kv_dtype)}")
        if c.device != device:
            raise RarefyError(f"{name} is on {c.device}, the query/keys on {device}")
        if not c.is_contiguous() and not (name == "v_cache" and c.transpose(2, 3).is_contiguous()):
            raise RarefyError(f"{name} must be contiguous" + (
                " (or, for v_cache, a [blocks, heads, block_size, head_dim] view of dim-major storage)"
                if name == "v_cache" else ""))
    if k_cache.shape != v_cache.shape:
        raise RarefyError(f"k_cache {_shape(k_cache)} and v_cache {_shape(v_cache)} differ in shape")
    if is_quantized(kv_dtype):
        want = tuple(k_cache.shape[:3])
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is None:
                raise RarefyError(f"kv_dtype {kv_dtype!r} needs {name} [num_blocks, num_kv_heads, block_size] float16")
            if tuple(s.shape) != want or s.dtype != SCALE_DTYPE:
                raise RarefyError(f"{name} must be {'x'.join(map(str, want))} float16, got {_shape(s)} {s.dtype}")
            if s.device != device or not s.is_contiguous():
                raise RarefyError(f"{name} must be a contiguous tensor on {device}")


def _check_decode(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype, on_gpu: bool):
    check_kv_dtype(kv_dtype)
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise RarefyError(f"q must be [batch, num_heads, head_dim], got {_shape(q)}")
    if q.dtype not in _Q_DTYPES:
        raise RarefyError(f"q must be bfloat16, float16 or float32, got {q.dtype}")
    if q.stride(-1) != 1:
        raise RarefyError("q's last dimension must be contiguous")
    _check_cache(k_cache, v_cache, k_scale, v_scale, kv_dtype, q.device)
    batch, num_heads, head_dim = q.shape
    num_blocks, num_kv_heads, block_size, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise RarefyError(f"q's head_dim {head_dim} differs from the cache's {cache_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise RarefyError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if on_gpu and (head_dim & (head_dim - 1) or not 16 <= head_dim <= 256):
        raise RarefyError(f"the GPU kernel supports head_dim = a power of two in 16..256, got {head_dim}")
    for name, t, dims in (("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype not in _INDEX_DTYPES:
            raise RarefyError(f"{name} must be a {dims}-D int32 tensor, got {_shape(t)} "
                              f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != q.device:
            raise RarefyError(f"{name} is on {t.device}, q on {q.device}")
        if t.shape[0] != batch:
            raise RarefyError(f"{name} has {t.shape[0]} rows for a batch of {batch}")
    if block_tables.stride(-1) != 1:
        raise RarefyError("block_tables' rows must be contiguous")
    if not seq_lens.is_contiguous():
        raise RarefyError("seq_lens must be contiguous")


def _check_lengths(seq_lens, block_tables, block_size) -> int:
    """Host-side check of the lengths (one synchronisation on CUDA); returns the longest."""
    if seq_lens.numel() == 0:
        return 0
    lo, hi = (int(x) for x in torch.aminmax(seq_lens))
    cap = block_tables.shape[1] * block_size
    if lo < 0:
        raise RarefyError(f"seq_lens must not be negative, got {lo}")
    if hi > cap:
        raise RarefyError(f"seq_len {hi} exceeds the block table's capacity ({block_tables.shape[1]} blocks x "
                          f"{block_size} tokens = {cap})")
    return hi


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def paged_decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype,
                           sm_scale=None, num_splits=None, max_seq_len=None) -> torch.Tensor:
    """Decode attention over the paged cache; see the module doc."""
    on_gpu = q.is_cuda if isinstance(q, torch.Tensor) else False
    _check_decode(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype, on_gpu)
    head_dim = q.shape[2]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    if num_splits is not None and (int(num_splits) != num_splits or num_splits < 1):
        raise RarefyError(f"num_splits must be a positive integer, got {num_splits}")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if on_gpu and _HAS_TRITON:
        if max_seq_len is None and not torch.cuda.is_current_stream_capturing():
            max_seq_len = _check_lengths(seq_lens, block_tables, k_cache.shape[2])
        return _decode_op(q, k_cache, v_cache, k_scale if is_quantized(kv_dtype) else None,
                          v_scale if is_quantized(kv_dtype) else None, block_tables, seq_lens, kv_dtype, sm_scale,
                          int(num_splits or 0), -1 if max_seq_len is None else int(max_seq_len))
    _check_lengths(seq_lens, block_tables, k_cache.shape[2])
    return paged_decode_attention_torch(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype,
                                        sm_scale)


def store_kv(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale, kv_dtype) -> None:
    """Write k, v [N, num_kv_heads, head_dim] to their slots, quantizing on write (module doc)."""
    check_kv_dtype(kv_dtype)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise RarefyError(f"{name} must be [num_tokens, num_kv_heads, head_dim], got {_shape(t)}")
        if not t.is_floating_point() or t.dtype.itemsize < 2:
            raise RarefyError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.stride(-1) != 1:
            raise RarefyError(f"{name}'s last dimension must be contiguous")
    if k.shape != v.shape:
        raise RarefyError(f"k {_shape(k)} and v {_shape(v)} differ in shape")
    _check_cache(k_cache, v_cache, k_scale, v_scale, kv_dtype, k.device)
    if v.device != k.device:
        raise RarefyError(f"v is on {v.device}, k on {k.device}")
    if tuple(k.shape[1:]) != (k_cache.shape[1], k_cache.shape[3]):
        raise RarefyError(f"k/v heads x head_dim {k.shape[1]}x{k.shape[2]} do not match the cache's "
                          f"{k_cache.shape[1]}x{k_cache.shape[3]}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1 \
            or slot_mapping.dtype not in _INDEX_DTYPES or slot_mapping.shape[0] != k.shape[0]:
        raise RarefyError(f"slot_mapping must be [{k.shape[0]}] int64, got {_shape(slot_mapping)}")
    if slot_mapping.device != k.device or not slot_mapping.is_contiguous():
        raise RarefyError(f"slot_mapping must be a contiguous tensor on {k.device}")
    if not k.is_cuda and slot_mapping.numel():
        hi = int(slot_mapping.max())
        cap = k_cache.shape[0] * k_cache.shape[2]
        if hi >= cap:
            raise RarefyError(f"slot {hi} is past the cache ({cap} slots)")
    if k.is_cuda and _HAS_TRITON:
        q = is_quantized(kv_dtype)
        _store_op(k, v, slot_mapping, k_cache, v_cache, k_scale if q else None, v_scale if q else None, kv_dtype)
        return
    store_kv_torch(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale, kv_dtype)
