"""TernaryLinear / Int8Linear: reference and dequantize-once-and-cache forwards."""

import pytest
import torch
import torch.nn.functional as F

from rarefy.errors import RarefyError
from rarefy.layers.linear import DenseLinear
from rarefy.layers.lowbit_linear import (Int8Linear, TernaryLinear, fake_quant_int8_per_token,
                                         set_lowbit_mode)


def _dense(n, k, bias):
    torch.manual_seed(n * 7 + k)
    d = DenseLinear(k, n, bias)
    d.weight.data.normal_(0, 0.1)
    if bias:
        d.bias.data.normal_()
    return d


@pytest.mark.parametrize("cls,group", [(TernaryLinear, None), (TernaryLinear, 8), (Int8Linear, None),
                                       (Int8Linear, 4)])
@pytest.mark.parametrize("n,k,bias", [(5, 24, False), (33, 16, True), (64, 96, False)])
def test_forward_is_the_dequantized_matmul_in_both_modes(cls, group, n, k, bias):
    dense = _dense(n, k, bias)
    m = cls.from_dense(dense, group)
    w = m.dequantized_weight(torch.float32)
    x = torch.randn(3, 7, k)
    want = F.linear(x, w, dense.bias)
    assert m.mode == "reference"
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    m.set_mode("cache")
    assert m.weight_cache is not None and m.weight_cache.shape == (n, k)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    m.set_mode("reference")
    assert m.weight_cache is None
    if cls is Int8Linear:  # int8 tracks the dense layer closely
        assert ((m(x) - dense(x)).norm() / dense(x).norm()) < 0.02


def test_state_dict_holds_packed_weights_not_the_cache():
    m = TernaryLinear.from_dense(_dense(8, 12, True), None)
    m.set_mode("cache")
    assert set(m.state_dict()) == {"weight_ternary", "weight_scale", "bias"}
    assert m.state_dict()["weight_ternary"].shape == (8, 3)
    i = Int8Linear.from_dense(_dense(8, 12, False), 4)
    assert set(i.state_dict()) == {"weight_int8", "weight_scale"}
    assert i.state_dict()["weight_scale"].shape == (8, 3)


def test_bf16_activations():
    m = Int8Linear.from_dense(_dense(16, 32, True))
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    want = F.linear(x.float(), m.dequantized_weight(), m.bias)
    assert ((y.float() - want).norm() / want.norm()) < 1e-2
    m.set_mode("cache", torch.bfloat16)
    assert m.weight_cache.dtype == torch.bfloat16 and m(x).dtype == torch.bfloat16


def test_int8_activation_quantization():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0], [3.0, 1.0, -2.0, 0.001]])
    xq = fake_quant_int8_per_token(x)
    s = 127.0 / x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(xq, (x * s).round().clamp(-128, 127) / s)
    m = TernaryLinear.from_dense(_dense(6, 4, False), act_quant="int8")
    torch.testing.assert_close(m(x), F.linear(xq, m.dequantized_weight()))
    assert "act_quant=int8" in repr(m)


def test_set_lowbit_mode_counts_and_validates():
    seq = torch.nn.Sequential(TernaryLinear.from_dense(_dense(4, 8, False)), Int8Linear.from_dense(_dense(4, 4, False)))
    assert set_lowbit_mode(seq, "cache") == 2
    with pytest.raises(RarefyError, match="mode"):
        set_lowbit_mode(seq, "fast")
    with pytest.raises(RarefyError, match="act_quant"):
        TernaryLinear(8, 4, act_quant="int4")
