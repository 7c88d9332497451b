"""Ternary packing (layout v1) and BitNet b1.58 absmean quantization."""

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.lowbit.ternary import (EPS, LAYOUT_VERSION, byte_lut, check_codes, dequantize_ternary,
                                   invalid_code_count, pack_ternary, packed_cols, quantize_ternary,
                                   quantize_ternary_values, unpack_ternary)


def test_layout_is_pinned_by_a_hand_written_example():
    # code = value + 1, four consecutive columns per byte, column 4j+i in bits 2i..2i+1
    values = torch.tensor([[-1, 0, 1, 1, 0],
                           [1, 1, 1, 1, -1]], dtype=torch.int8)
    # row 0: codes 0,1,2,2 -> 0b10_10_01_00 = 0xA4; then 1 + padding 1,1,1 -> 0b01_01_01_01 = 0x55
    # row 1: codes 2,2,2,2 -> 0xAA; then 0 + padding -> 0b01_01_01_00 = 0x54
    want = torch.tensor([[0xA4, 0x55], [0xAA, 0x54]], dtype=torch.uint8)
    assert LAYOUT_VERSION == 1
    assert torch.equal(pack_ternary(values), want)
    assert torch.equal(unpack_ternary(want, 5), values)


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 2), (1, 3), (1, 4), (2, 5), (3, 7), (7, 13), (64, 4),
                                       (17, 1023), (5, 1024), (0, 9), (4, 0)])
def test_pack_unpack_round_trip_odd_shapes(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    values = torch.randint(-1, 2, (rows, cols), generator=g, dtype=torch.int8)
    packed = pack_ternary(values)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (rows, packed_cols(cols))
    assert torch.equal(unpack_ternary(packed, cols), values)
    assert invalid_code_count(packed) == 0
    if cols % 4:  # padding is value 0 (code 0b01)
        tail = unpack_ternary(packed, packed_cols(cols) * 4)[:, cols:]
        assert (tail == 0).all()


def test_byte_lut_agrees_with_unpack_for_every_valid_byte():
    lut = byte_lut()
    assert lut.shape == (256, 4) and lut.dtype == torch.int8
    for b in range(256):
        codes = [(b >> (2 * i)) & 3 for i in range(4)]
        if 3 in codes:
            continue
        assert lut[b].tolist() == [c - 1 for c in codes]
        assert unpack_ternary(torch.tensor([[b]], dtype=torch.uint8), 4)[0].tolist() == [c - 1 for c in codes]


def test_invalid_codes_are_refused():
    packed = torch.tensor([[0x55, 0b11010101, 0xFF]], dtype=torch.uint8)
    assert invalid_code_count(packed) == 1 + 4
    with pytest.raises(RarefyError, match="invalid 2-bit code"):
        check_codes(packed, "w")
    check_codes(torch.tensor([[0x00, 0xAA, 0x55]], dtype=torch.uint8))


def test_pack_refuses_non_ternary_values():
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([[2, 0]]))
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([[0.5, 0.0]]))


def _bitnet_reference(w, group_size=None):
    """The BitNet b1.58 formula, written out group by group: scale = 1 / mean|W| clamped
    at 1e-5, Q = clamp(round(W * scale), -1, 1)."""
    w = w.float()
    if group_size is None:
        scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        return (w * scale).round().clamp(-1, 1), (1.0 / scale).reshape(1, 1)
    q = torch.empty_like(w)
    s = torch.empty(w.shape[0], w.shape[1] // group_size)
    for r in range(w.shape[0]):
        for gi in range(w.shape[1] // group_size):
            blk = w[r, gi * group_size:(gi + 1) * group_size]
            scale = 1.0 / blk.abs().mean().clamp(min=1e-5)
            q[r, gi * group_size:(gi + 1) * group_size] = (blk * scale).round().clamp(-1, 1)
            s[r, gi] = 1.0 / scale
    return q, s


@pytest.mark.parametrize("group_size", [None, 4, 8, 32])
def test_quantization_matches_the_bitnet_formula(group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * 0.05
    w[3] = 0  # an all-zero row: scale clamps at eps
    q, s = quantize_ternary_values(w, group_size)
    want_q, want_s = _bitnet_reference(w, group_size)
    assert torch.equal(q.float(), want_q)
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=0)
    tw = quantize_ternary(w, group_size)
    assert torch.equal(tw.codes(), q)
    deq = tw.dequantize()
    exp_s = want_s if group_size is None else want_s.repeat_interleave(group_size, 1)
    torch.testing.assert_close(deq, want_q * exp_s, rtol=1e-6, atol=1e-9)
    assert set(q.unique().tolist()) <= {-1, 0, 1}


def test_zero_matrix_and_eps():
    tw = quantize_ternary(torch.zeros(3, 8))
    assert (tw.codes() == 0).all() and tw.scale.item() == pytest.approx(EPS)


def test_per_group_scales_adapt_to_each_group():
    w = torch.cat([torch.full((2, 8), 0.01), torch.full((2, 8), 3.0)], dim=1)
    tw = quantize_ternary(w, 8)
    torch.testing.assert_close(tw.dequantize(), w)  # each group is one constant: exact
    pt = quantize_ternary(w)  # one scale for both: the small group collapses to 0
    assert (pt.codes()[:, :8] == 0).all()


@pytest.mark.parametrize("group_size,msg", [(6, "does not divide"), (2, "multiple of 4"), (0, "positive")])
def test_bad_group_sizes(group_size, msg):
    with pytest.raises(RarefyError, match=msg):
        quantize_ternary(torch.randn(4, 16), group_size)


def test_fp16_scales_are_what_the_values_were_computed_with():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    tw = quantize_ternary(w, 16, scale_dtype=torch.float16)
    assert tw.scale.dtype == torch.float16
    inv = (1.0 / tw.scale.float()).repeat_interleave(16, 1)
    assert torch.equal(tw.codes().float(), (w * inv).round().clamp(-1, 1))


def test_nan_is_refused():
    w = torch.randn(4, 8)
    w[0, 0] = float("nan")
    with pytest.raises(RarefyError, match="NaN"):
        quantize_ternary(w)


def test_dequantize_dtype():
    tw = quantize_ternary(torch.randn(4, 12))
    d = dequantize_ternary(tw.packed, tw.scale, 12, None, torch.bfloat16)
    assert d.dtype == torch.bfloat16 and d.shape == (4, 12)
