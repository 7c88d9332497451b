"""TernaryLinear / Int8Linear in "fused" mode agree with the reference forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rarefy.layers.lowbit_linear import Int8Linear, TernaryLinear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [TernaryLinear, Int8Linear])
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 40 > CPU_FUSED_MAX_ROWS: the reference path on CPU
def test_fused_equals_reference(device, cls, group, rows):
    torch.manual_seed(rows + (group or 0))
    dense = nn.Linear(192, 77, bias=True)
    layer = cls.from_dense(dense, group_size=group).to(device)
    x = torch.randn(rows, 192, device=device)
    layer.set_mode("reference")
    want = layer(x)
    layer.set_mode("fused")
    got = layer(x)
    assert got.shape == want.shape and torch.isfinite(got).all()
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel < 2e-3, rel
