"""Weight-only int8: per output channel and per group, symmetric."""

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.lowbit.int8 import dequantize_int8, quantize_int8


@pytest.mark.parametrize("group_size", [None, 1, 16, 64, 96])
def test_error_bound_per_channel_and_group(group_size):
    torch.manual_seed(0)
    w = torch.randn(40, 192) * torch.logspace(-3, 1, 40).unsqueeze(1)  # rows of very different ranges
    w[5] = 0.0
    iw = quantize_int8(w, group_size)
    assert iw.qweight.dtype == torch.int8 and iw.qweight.shape == w.shape
    g = w.shape[1] if group_size is None else group_size
    assert iw.scale.shape == (40, w.shape[1] // g)
    assert iw.qweight.min() >= -127 and iw.qweight.max() <= 127
    deq = iw.dequantize()
    amax = w.abs().view(40, -1, g).amax(-1, keepdim=True)
    err = (w - deq).abs().view(40, -1, g)
    assert (err <= amax / 254 * (1 + 1e-5) + 1e-12).all()
    assert (deq[5] == 0).all()
    # the largest element of each nonzero group is exact up to rounding of the scale
    big = w.abs().view(40, -1, g).argmax(-1, keepdim=True)
    assert (iw.qweight.view(40, -1, g).gather(-1, big).abs()[amax > 0] == 127).all()


def test_matches_the_formula():
    torch.manual_seed(2)
    w = torch.randn(6, 32)
    iw = quantize_int8(w)
    s = w.abs().amax(1, keepdim=True) / 127
    assert torch.equal(iw.qweight, (w / s).round().clamp(-127, 127).to(torch.int8))
    torch.testing.assert_close(iw.scale, s)
    torch.testing.assert_close(dequantize_int8(iw.qweight, iw.scale, None), iw.qweight.float() * s)


def test_group_error_is_smaller_than_channel_error_with_outliers():
    torch.manual_seed(3)
    w = torch.randn(16, 256) * 0.02
    w[:, 7] = 5.0  # one outlier column
    e_ch = (w - quantize_int8(w).dequantize()).pow(2).mean()
    e_g = (w - quantize_int8(w, 32).dequantize()).pow(2).mean()
    assert e_g < e_ch / 5  # 7 of 8 groups no longer share the outlier's scale


@pytest.mark.parametrize("group_size,msg", [(7, "does not divide"), (0, "positive"), (-4, "positive")])
def test_bad_group_sizes(group_size, msg):
    with pytest.raises(RarefyError, match=msg):
        quantize_int8(torch.randn(4, 64), group_size)


def test_fp16_scales_and_bf16_dequantize():
    torch.manual_seed(4)
    w = torch.randn(8, 64)
    iw = quantize_int8(w, 32, scale_dtype=torch.float16)
    assert iw.scale.dtype == torch.float16
    s = iw.scale.float().repeat_interleave(32, 1)
    assert torch.equal(iw.qweight, (w / s).round().clamp(-127, 127).to(torch.int8))
    assert iw.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_refuses_non_2d_and_integers():
    with pytest.raises(RarefyError):
        quantize_int8(torch.randn(4))
    with pytest.raises(RarefyError):
        quantize_int8(torch.ones(4, 4, dtype=torch.int32))
