"""KV-cache storage dtypes and their quantize / dequantize rules (the reference).

Every kernel and cache path in rarefy agrees with these functions bit for bit on
the stored values (see docs/kv-cache.md):

- "bf16", "fp16", "fp32": stored as is, no scales (fp32 is for exact comparisons and
  float32 CPU runs; it is not a memory saver).
- "int8": per (token, kv head) scale s = amax(|x|) / 127 over the head_dim values,
  rounded to float16 *first*; stored q = clamp(round(x / float(s)), -127, 127).
- "fp8_e4m3", "fp8_e5m2": per (token, kv head) scale s = amax / FP8_MAX, rounded to
  float16 first; stored q = (x / float(s)) clamped to ±FP8_MAX, cast to float8.
- dequantize: float(q) * float(s).

Scales are float16 so that an int8 or fp8 entry costs head_dim + 2 bytes against
2 * head_dim for bf16 (50.8% at head_dim 128, 51.6% at 64). The scale is clamped to
at least 2**-14 (float16's smallest normal) so it never flushes to zero; a head
vector with amax below 127 * 2**-14 ≈ 0.0078 is then quantized more coarsely, which
costs nothing measurable next to the vectors around it.
"""

from __future__ import annotations

import torch

from rarefy.errors import RarefyError

KV_DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3", "fp8_e5m2", "int8")
_STORAGE = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0 ** -14


def check_kv_dtype(name: str) -> str:
    if name not in _STORAGE:
        raise RarefyError(f"unknown KV-cache dtype {name!r}; choose one of {', '.join(KV_DTYPES)}")
    return name


def storage_dtype(name: str) -> torch.dtype:
    return _STORAGE[check_kv_dtype(name)]


def is_quantized(name: str) -> bool:
    return check_kv_dtype(name) in QMAX


def bytes_per_token(name: str, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token occupies in the cache: K and V, every layer, scales included."""
    per_head = head_dim * storage_dtype(name).itemsize
    if is_quantized(name):
        per_head += SCALE_DTYPE.itemsize
    return 2 * num_layers * num_kv_heads * per_head


def quantize(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [..., head_dim] float → (stored values [..., head_dim], scales [...] float16 or None)."""
    dtype = storage_dtype(name)
    if not is_quantized(name):
        return x.to(dtype), None
    qmax = QMAX[name]
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = (amax / qmax).clamp_min(MIN_SCALE).to(SCALE_DTYPE)
    y = (xf / scale.float()[..., None]).clamp(-qmax, qmax)
    if name == "int8":
        y = y.round()
    return y.to(dtype), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, out_dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize: [..., head_dim] in out_dtype."""
    if scale is None:
        return q.to(out_dtype)
    return (q.float() * scale.float()[..., None]).to(out_dtype)


def roundtrip(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as it reads back from a cache of dtype `name`, in x's dtype."""
    q, s = quantize(x, name)
    return dequantize(q, s, x.dtype)
