"""Orthogonal rotations of the sparsified inputs, folded into the weights: the dense model is
unchanged, the rotations are orthogonal, and the sparsified inputs really are rotated."""

from __future__ import annotations

import pytest
import torch
from test_activation import _held_out, _model, _tokens

from rarefy.errors import RarefyError
from rarefy.sparsity.activation import input_sites
from rarefy.sparsity.activation_rotation import (
    RotatedNorm,
    check_rotation,
    rotate_model,
)


def _windows():
    return [_tokens(128, 5 + i) for i in range(4)]


@pytest.mark.parametrize("kinds", [["vo"], ["residual"], ["layer"], ["vo", "residual"]])
@pytest.mark.parametrize("basis", ["pca", "svd"])
def test_rotation_keeps_the_dense_model(kinds, basis):
    torch.set_num_threads(1)
    model = _model()
    model.model.norm.weight.data.normal_(1.0, 0.1)
    x = _held_out()
    with torch.no_grad():
        ref = model(x)
    info = rotate_model(model, kinds, _windows(), basis)
    assert info["kinds"] == kinds
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).abs().max()) <= 2e-6 * float(ref.abs().max())
    if "residual" in kinds:  # tied embeddings are untied, every gain is folded
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        for layer in model.model.layers:
            assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
    if "layer" in kinds:
        for layer in model.model.layers:
            r = layer.input_layernorm.rotation
            assert isinstance(layer.input_layernorm, RotatedNorm)
            assert torch.allclose(r.t() @ r, torch.eye(r.shape[0]), atol=1e-5)


def test_pca_rotation_concentrates_the_inputs():
    """In the pca basis the attention input's energy sits in its first channels."""
    torch.set_num_threads(1)
    model = _model()
    seen = []
    sites = input_sites(model)
    hook = sites["1.attn_in"].hook.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    rotate_model(model, ["layer"], _windows(), "pca")
    with torch.no_grad():
        model(torch.tensor(_windows()))  # the calibration windows: E[x'^T x'] is diagonal, sorted
    hook.remove()
    energy = seen[-1].pow(2).reshape(-1, seen[-1].shape[-1]).mean(0)
    assert torch.all(energy[:-1] >= energy[1:] - 1e-6 * float(energy.max()))  # sorted, largest first


def test_bad_rotation_options():
    with pytest.raises(RarefyError, match="unknown rotation"):
        check_rotation(["spin"], "pca")
    with pytest.raises(RarefyError, match="one of the residual and layer"):
        check_rotation(["residual", "layer"], "pca")
    with pytest.raises(RarefyError, match="basis"):
        check_rotation(["vo"], "hadamard")
    with pytest.raises(RarefyError, match="windows"):
        rotate_model(_model(), ["vo"], None, "pca")
