"""Stacking low-bit q/k/v and gate/up (fuse_lowbit, used by fuse_projections on CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rarefy.layers.lowbit_linear import Int8Linear, TernaryLinear, fuse_lowbit

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layers(cls, group, outs=(96, 32, 32), bias=False, seed=0):
    torch.manual_seed(seed)
    return [cls.from_dense(nn.Linear(128, o, bias=bias), group_size=group) for o in outs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls,group", [(TernaryLinear, None), (TernaryLinear, 32), (Int8Linear, None),
                                       (Int8Linear, 64)])
@pytest.mark.parametrize("mode", ["reference", "cache", "fused"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_stack_equals_concatenated_outputs(device, cls, group, mode, bias):
    parts = [m.to(device) for m in _layers(cls, group, bias=bias, seed=3)]
    for m in parts:
        m.set_mode(mode)
    fused = fuse_lowbit(parts)
    assert fused is not None and fused.out_features == 160 and fused.mode == mode
    x = torch.randn(3, 128, device=device)
    want = torch.cat([m(x) for m in parts], dim=-1)
    got = fused(x)
    assert torch.isfinite(got).all()
    # the same packed codes and scales: equal up to the kernels' summation order
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel < 1e-5, rel
    # a per-tensor ternary stack keeps each layer's scale on its rows
    if cls is TernaryLinear and group is None:
        assert fused.group_size == 128
        assert torch.equal(fused.weight_scale[:96, 0], parts[0].weight_scale.reshape(1).expand(96))


def test_refuses_what_cannot_be_stacked():
    t = _layers(TernaryLinear, None, outs=(16, 16))
    i = _layers(Int8Linear, None, outs=(16, 16))
    assert fuse_lowbit([t[0], i[0]]) is None  # two kinds
    assert fuse_lowbit([i[0], _layers(Int8Linear, 64, outs=(16,))[0]]) is None  # group sizes differ
    a, b = _layers(TernaryLinear, None, outs=(16, 16))
    b.set_mode("cache")
    assert fuse_lowbit([a, b]) is None  # modes differ
    c = _layers(TernaryLinear, None, outs=(16,), bias=True)[0]
    assert fuse_lowbit([a, c]) is None  # bias on one only
    assert fuse_lowbit([nn.Linear(4, 4), nn.Linear(4, 4)]) is None


def test_model_fuse_projections_stacks_lowbit_layers():
    from rarefy.config import ModelConfig
    from rarefy.lowbit.quantize import quantize_model
    from rarefy.models.llama import DecoderLM

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = DecoderLM(cfg).float().eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    quantize_model(model, "ternary")
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        want = model(ids)
        model.fuse_projections()
        got = model(ids)
    layer = model.model.layers[0] if hasattr(model, "model") else model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, TernaryLinear) and isinstance(layer.mlp.gate_up_proj, TernaryLinear)
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "gate_proj")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
