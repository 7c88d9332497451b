"""Calibration file format 4: the v/o rotation carried in a safetensors sidecar. Round trip,
folding keeps the dense model, applying a file rotates the model once, and a missing,
foreign or mis-shaped sidecar is one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from test_activation import _held_out, _model, _tokens

from rarefy.commands.calibrate_activations import load_activation_level
from rarefy.errors import RarefyError
from rarefy.sparsity.activation import (
    calibrate_thresholds,
    load_thresholds,
    save_thresholds,
    sparsify_activations,
)
from rarefy.sparsity.activation_rotation import (
    SIDECAR,
    apply_vo_rotations,
    compute_vo_rotations,
    save_vo_rotations,
)

FILE = "activation_thresholds.json"


def _windows():
    return [_tokens(128, 5 + i) for i in range(2)]


def _calibrated(tmp_path, rotate=True):
    """A model rotated and calibrated (uniform, 0 and 0.4), saved to tmp_path; the rotated model."""
    model = _model()
    mats = compute_vo_rotations(model, _windows())
    if rotate:
        apply_vo_rotations(model, mats)
    th = calibrate_thresholds(model, _tokens(1000, 1), [0.0, 0.4], seq_len=64, samples=4)
    if rotate:
        th.rotation, th.rotations = {"kind": "vo", "basis": "pca", "windows": 2}, mats
    save_thresholds(th, tmp_path / FILE)
    return model, th


def test_v4_round_trip(tmp_path):
    _, th = _calibrated(tmp_path)
    data = json.loads((tmp_path / FILE).read_text())
    assert data["version"] == 4 and data["rotation"]["file"] == SIDECAR and len(data["rotation"]["sha256"]) == 64
    assert (tmp_path / SIDECAR).is_file() and not list(tmp_path.glob("*.tmp*"))
    back = load_thresholds(tmp_path / FILE, _model())
    assert back.version == 4 and back.rotation["basis"] == "pca" and back.rule(0.4) == th.rule(0.4)
    assert len(back.rotations) == 2 and all(len(rs) == 2 for rs in back.rotations)  # layers x kv heads
    for rs, ws in zip(back.rotations, th.rotations):
        for r, w in zip(rs, ws):
            assert r.shape == (16, 16) and torch.equal(r, w.float())
    # unrotated calibrations stay version 3 (older readers keep reading them)
    plain = tmp_path / "plain"
    plain.mkdir()
    _calibrated(plain, rotate=False)
    data = json.loads((plain / FILE).read_text())
    assert data["version"] == 3 and "rotation" not in data and not (plain / SIDECAR).exists()
    assert load_thresholds(plain / FILE, _model()).rotations is None


def test_folding_keeps_the_dense_model_and_applies_once(tmp_path):
    torch.set_num_threads(1)
    rotated, th = _calibrated(tmp_path)
    x = _held_out()
    fresh = _model()
    with torch.no_grad():
        ref = fresh(x)
        got, level = load_activation_level(fresh, str(tmp_path), 0.4)  # folds the file's rotation
        out = fresh(x)
        assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
        assert not torch.equal(fresh.model.layers[0].self_attn.v_proj.weight,
                               _model().model.layers[0].self_attn.v_proj.weight)  # really rotated
        # the file's rotation is the one calibrated on: same weights, same sparse outputs
        for a, b in zip(fresh.parameters(), rotated.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        load_activation_level(fresh, str(tmp_path), 0.4)  # a second load does not rotate again
        torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
        with sparsify_activations(fresh, got.rule(0.0)):  # level 0: thresholds 0, the dense model
            torch.testing.assert_close(fresh(x), ref, rtol=1e-5, atol=1e-5)
        with sparsify_activations(fresh, got.rule(level)), sparsify_activations(rotated, th.rule(level)):
            torch.testing.assert_close(fresh(x), rotated(x), rtol=1e-5, atol=1e-5)
    other = _model(seed=3)
    apply_vo_rotations(other, th.rotations, tag="another")
    with pytest.raises(RarefyError, match="already carries another calibration"):
        load_activation_level(other, str(tmp_path), 0.4)


def test_sidecar_errors(tmp_path):
    _calibrated(tmp_path)
    side = tmp_path / SIDECAR
    good = side.read_bytes()
    side.unlink()
    with pytest.raises(RarefyError, match="rotation sidecar .* is missing"):
        load_thresholds(tmp_path / FILE, _model())
    side.write_bytes(b"not safetensors")
    with pytest.raises(RarefyError, match="checksum differs"):
        load_thresholds(tmp_path / FILE)
    # shapes that do not fit the model (sidecar rewritten, checksum updated): refused
    data = json.loads((tmp_path / FILE).read_text())
    data["rotation"]["sha256"] = save_vo_rotations(side, [[torch.eye(8)] * 2] * 2)
    (tmp_path / FILE).write_text(json.dumps(data))
    with pytest.raises(RarefyError, match=r"layers.0.vo has shape \[2, 8, 8\], this model needs \[2, 16, 16\]"):
        load_thresholds(tmp_path / FILE, _model())
    data["rotation"]["sha256"] = save_vo_rotations(side, [[torch.eye(16)] * 2] * 3)
    (tmp_path / FILE).write_text(json.dumps(data))
    with pytest.raises(RarefyError, match="has 3 layers, this model 2"):
        load_thresholds(tmp_path / FILE, _model())
    data["rotation"]["sha256"] = save_vo_rotations(side, [[torch.eye(16) * 2] * 2] * 2)
    (tmp_path / FILE).write_text(json.dumps(data))
    with pytest.raises(RarefyError, match="not orthogonal"):
        load_thresholds(tmp_path / FILE, _model())
    side.write_bytes(good)
    for change, msg in [({"file": "../x.safetensors"}, "must name a file beside it"),
                        ({"kind": "residual"}, "unknown rotation 'residual'")]:
        bad = dict(data, rotation=dict(data["rotation"], **change))
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(RarefyError, match=msg):
            load_thresholds(tmp_path / "bad.json", _model())
    for change, msg in [({"version": 3}, "needs a version 4 file"), ({"rotation": {}}, "must describe its rotation")]:
        (tmp_path / "bad.json").write_text(json.dumps(dict(data, **change)))
        with pytest.raises(RarefyError, match=msg):
            load_thresholds(tmp_path / "bad.json")
