"""Triton store-on-write into the paged KV cache: one program per (token, kv head).

Program ``(i, h)`` reads ``k[i, h, :]`` and ``v[i, h, :]`` and writes them to slot
``slot_mapping[i]`` (block ``slot // block_size``, offset ``slot % block_size``);
a negative slot is skipped (padding rows of a CUDA-graph batch). Quantized dtypes follow
``rarefy.kv.quant.quantize`` step for step, so the stored values and scales are bit-identical
to it on a GPU:

    scale = float16(max(amax(|x|) / QMAX, 2**-14))      # IEEE division (div_rn), RNE to fp16
    y     = clamp(x / float(scale), -QMAX, QMAX)         # IEEE division
    int8: rint(y) (round half to even) ; fp8: cast with round-to-nearest-even

The fp8 and fp32 -> bf16 roundings are done explicitly (``_rne_fp8``, ``_rne_bf16``: round
to nearest even on the target grid with exact float/bit arithmetic), so the final cast only
converts an exactly representable value. On a GPU this equals the hardware's RNE cast; it
exists because the Triton 3.6 *interpreter* rounds those casts wrongly (it truncates
fp32 -> bf16 and drops the carry when an fp8 mantissa rounds up to the next power of two),
and with it the CPU tests check the kernel's arithmetic bit for bit. The interpreter still
flushes fp8 subnormals to zero on the final cast; the CPU test allows exactly that.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents

from rarefy.kv.quant import MIN_SCALE, QMAX

_QCODE = {"int8": 1, "fp8_e4m3": 2, "fp8_e5m2": 3}
#: (mantissa bits, smallest normal exponent) of the fp8 formats.
_FP8 = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14)}


@triton.jit
def _rint(y, RINT: tl.constexpr):
    """Round half to even, |y| < 2**22."""
    if RINT:
        return libdevice.rint(y)
    else:  # the interpreter has no libdevice: the 1.5 * 2**23 trick (fp32 adds round to nearest even)
        return (y + 12582912.0) - 12582912.0


@triton.jit
def _rne_fp8(y, MBITS: tl.constexpr, EMIN: tl.constexpr, RINT: tl.constexpr):
    """y (fp32, |y| <= the format's max) rounded to nearest even on the fp8 grid, as fp32."""
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN)  # subnormals share the smallest normal binade's step
    step = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)  # 2**(e - MBITS)
    inv = ((MBITS - e + 127) << 23).to(tl.float32, bitcast=True)   # 2**(MBITS - e)
    return _rint(y * inv, RINT) * step  # both products exact (powers of two, normal results)


@triton.jit
def _rne_bf16(x):
    """fp32 rounded to nearest even on the bf16 grid, as fp32 (finite inputs)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quant_store(x, dst_ptr, dst_off, sc_ptr, sc_off, ok, QUANT: tl.constexpr, QMAXV: tl.constexpr,
                 MIN_S: tl.constexpr, RINT: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                 TO_BF16: tl.constexpr, D_MASK):
    if QUANT == 0:
        if TO_BF16:  # from fp32/fp16: explicit RNE, then an exact cast
            x = _rne_bf16(x.to(tl.float32))
        tl.store(dst_ptr + dst_off, x.to(dst_ptr.dtype.element_ty), mask=D_MASK & ok)
    else:
        xf = x.to(tl.float32)
        amax = tl.max(tl.abs(xf), axis=0)
        scale = tl.maximum(tl.math.div_rn(amax, QMAXV), MIN_S).to(tl.float16)
        y = tl.math.div_rn(xf, scale.to(tl.float32))
        y = tl.minimum(tl.maximum(y, -QMAXV), QMAXV)
        if QUANT == 1:
            tl.store(dst_ptr + dst_off, _rint(y, RINT).to(tl.int8), mask=D_MASK & ok)
        else:
            y = _rne_fp8(y, MBITS, EMIN, RINT)
            tl.store(dst_ptr + dst_off, y.to(dst_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                     mask=D_MASK & ok)
        tl.store(sc_ptr + sc_off, scale, mask=ok)


@triton.jit
def _store_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cb, stride_ch, stride_ct,
    stride_vcb, stride_vch, stride_vct, stride_vcd,
    stride_sb, stride_sh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    QMAXV: tl.constexpr,
    MIN_S: tl.constexpr,
    RINT: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    TO_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # the decode kernel after may launch now (programmatic dependent launch): it waits
        gdc_launch_dependents()  # for this grid's writes in its gdc_wait
    i = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    ok = slot >= 0
    slot = tl.where(ok, slot, 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    dst = blk * stride_cb + h * stride_ch + off * stride_ct + offs_d
    sc = blk * stride_sb + h * stride_sh + off
    k = tl.load(k_ptr + i.to(tl.int64) * stride_kn + h * stride_kh + offs_d, mask=d_mask, other=0.0)
    _quant_store(k, kc_ptr, dst, ks_ptr, sc, ok, QUANT, QMAXV, MIN_S, RINT, MBITS, EMIN, TO_BF16, d_mask)
    v = tl.load(v_ptr + i.to(tl.int64) * stride_vn + h * stride_vh + offs_d, mask=d_mask, other=0.0)
    # V may be dim-major storage (tokens contiguous, docs/kv-cache.md): its own strides
    v_dst = blk * stride_vcb + h * stride_vch + off * stride_vct + offs_d * stride_vcd
    _quant_store(v, vc_ptr, v_dst, vs_ptr, sc, ok, QUANT, QMAXV, MIN_S, RINT, MBITS, EMIN, TO_BF16, d_mask)


def store_kv_triton(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale, kv_dtype: str) -> None:
    """Launch the store kernel (inputs validated by the dispatcher in ``__init__``)."""
    n, num_kv_heads, head_dim = k.shape
    if n == 0:
        return
    block_size = k_cache.shape[2]
    qcode = _QCODE.get(kv_dtype, 0)
    if qcode:
        ks, vs, ssb, ssh = k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)
    else:
        ks, vs, ssb, ssh = k_cache, v_cache, 0, 0
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    _store_kernel[(n, num_kv_heads)](
        k, v, slot_mapping, k_cache, v_cache, ks, vs,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        ssb, ssh,
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        QUANT=qcode, QMAXV=float(QMAX.get(kv_dtype, 1.0)), MIN_S=float(MIN_SCALE), RINT=not interp,
        MBITS=_FP8.get(kv_dtype, (0, 0))[0], EMIN=_FP8.get(kv_dtype, (0, 0))[1],
        TO_BF16=kv_dtype == "bf16" and k.dtype != torch.bfloat16,
        PDL=not interp and k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9,
        num_warps=1 if head_dim <= 128 else 2,
    )


__all__ = ["store_kv_triton"]
