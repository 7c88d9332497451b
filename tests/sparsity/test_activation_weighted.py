"""The weighted criterion (|x| * column norm, WINA-style) and sequential calibration."""

from __future__ import annotations

import json

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.activation import (INPUT_NAMES, LevelRule, calibrate_from_statistics, calibrate_thresholds,
                                        collect_statistics, input_weights, load_thresholds, save_thresholds,
                                        sparsify_activations, sparsity_report)
from rarefy.sparsity.activation_criteria import column_norms, input_scales
from rarefy.sparsity.activation_modes import apply_rule

from test_activation import _held_out, _model, _tokens


@pytest.fixture(scope="module")
def setup():
    model = _model()
    data = collect_statistics(model, _tokens(4000, 1), seq_len=128, samples=16, keep_windows=2,
                              criteria=("magnitude", "weighted"))
    return model, data


def test_scales_are_the_column_norms_of_the_projections_reading_each_input():
    model = _model()
    sc = input_scales(model, "weighted")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.allclose(sc["1.attn_in"], qkv.norm(dim=0))
    assert torch.allclose(sc["1.o_in"], attn.o_proj.weight.norm(dim=0))
    assert torch.allclose(sc["1.mlp_in"], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).norm(dim=0))
    assert torch.allclose(sc["1.down_in"], mlp.down_proj.weight.norm(dim=0))
    assert input_scales(model, "magnitude") is None
    model.fuse_projections()  # fused or not, the same scales
    assert torch.allclose(input_scales(model, "weighted")["1.attn_in"], sc["1.attn_in"])
    # a zero column gets a small positive scale (finite 1 / c when folded)
    w = torch.randn(5, 4)
    w[:, 2] = 0
    c = column_norms([w])
    assert c[2] > 0 and c[2] < 1e-5 * c.max()


@pytest.mark.parametrize("mode", ["threshold", "topk", "adaptive"])
def test_rule_ranks_by_magnitude_times_scale(mode):
    x = torch.randn(3, 5, 40)
    c = torch.rand(40) * 3 + 0.1
    y, dropped = apply_rule(mode, {"threshold": 0.8, "topk": 0.5, "adaptive": 0.6}[mode], x, c)
    ref, ref_dropped = apply_rule(mode, {"threshold": 0.8, "topk": 0.5, "adaptive": 0.6}[mode], x * c)
    assert torch.equal(y != 0, ref != 0) and int(dropped) == int(ref_dropped)
    assert torch.equal(y[y != 0], x[y != 0])  # kept entries are x itself, not x * c


@pytest.mark.parametrize("mode", ["threshold", "adaptive", "topk"])
def test_weighted_thresholds_reach_target_on_held_out(setup, mode):
    model, data = setup
    th = calibrate_from_statistics(model, data, [0.25, 0.4, 0.5], mode, criterion="weighted")
    assert th.criterion == "weighted" and th.rule(0.4).criterion == "weighted"
    for s in (0.25, 0.4, 0.5):
        with torch.no_grad(), sparsify_activations(model, th.rule(s)) as counts:
            model(_held_out())
        report = sparsity_report(counts, model)
        assert abs(report["weighted"] - s) < 0.02 and abs(report["entries"] - s) < 0.02, (mode, s, report)


@pytest.mark.parametrize("criterion", ["magnitude", "weighted"])
def test_sequential_reaches_each_input_target_on_held_out(setup, criterion):
    model, data = setup
    th = calibrate_from_statistics(model, data, [0.5], "threshold", criterion=criterion, sequential=True)
    assert th.calibration["sequential"] == {"windows": 16}
    dense_th = calibrate_from_statistics(model, data, [0.5], "threshold", criterion=criterion)
    errs = {}
    for name, t in (("sequential", th), ("dense", dense_th)):
        with torch.no_grad(), sparsify_activations(model, t.rule(0.5)) as counts:
            model(_held_out())
        report = sparsity_report(counts, model)
        errs[name] = sum(abs(z / n - 0.5) for z, n in counts.values()) / len(counts)  # mean over inputs
        if name == "sequential":
            assert abs(report["weighted"] - 0.5) < 0.02 and abs(report["entries"] - 0.5) < 0.02, report
    assert errs["sequential"] < 0.03 and errs["sequential"] <= errs["dense"], errs


def test_weighted_greedy_layer_average_is_the_target(setup):
    model, data = setup
    th = calibrate_from_statistics(model, data, [0.4], "threshold", greedy=True, greedy_step=0.1,
                                   greedy_tokens=64, criterion="weighted", sequential=True)
    w = input_weights(model)
    per_input = th.sparsity_of_inputs(0.4)
    for layer in range(2):
        names = [f"{layer}.{n}" for n in INPUT_NAMES]
        assert sum(w[n] * per_input[n] for n in names) / sum(w[n] for n in names) == pytest.approx(0.4, abs=1e-6)
    with torch.no_grad(), sparsify_activations(model, th.rule(0.4)) as counts:
        model(_held_out())
    assert abs(sparsity_report(counts, model)["weighted"] - 0.4) < 0.03


def test_weighted_beats_magnitude_when_column_norms_differ():
    """The criterion's point: zeroing x_i changes W x by |x_i| * ||W[:, i]||. With orthogonal
    columns of different norms, dropping the smallest |x_i| * c_i is the least output change
    at a given count; |x| alone is worse."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    w = q * (torch.rand(64) * 3 + 0.05)  # orthogonal columns, norms 0.05 .. 3
    x = torch.randn(200, 64)
    c = column_norms([w])
    err = {}
    for crit, scale in (("magnitude", None), ("weighted", c)):
        y, _ = apply_rule("topk", 0.5, x, scale)
        err[crit] = ((y - x) @ w.t()).norm(dim=-1)
    assert (err["weighted"] <= err["magnitude"] + 1e-5).all()
    assert float(err["weighted"].mean()) < 0.8 * float(err["magnitude"].mean()), err


def test_file_v3_round_trip_and_bad_input(tmp_path, setup):
    model, data = setup
    th = calibrate_from_statistics(model, data, [0.4], "threshold", criterion="weighted", sequential=True)
    path = tmp_path / "w.json"
    save_thresholds(th, path)
    saved = json.loads(path.read_text())
    assert saved["version"] == 3 and saved["criterion"] == "weighted"
    assert saved["inputs"]["0.o_in"]["scale_norm"] > 0 and saved["calibration"]["sequential"]["windows"] == 16
    back = load_thresholds(path, model)
    assert back.criterion == "weighted" and back.rule(0.4) == th.rule(0.4)
    with pytest.raises(RarefyError, match="weighted criterion: its thresholds apply to"):
        back.for_sparsity(0.4)  # a plain dict would silently apply them to |x|

    def broken(edit, match, m=model):
        d = json.loads(json.dumps(saved))
        edit(d)
        p = tmp_path / "broken.json"
        p.write_text(json.dumps(d))
        with pytest.raises(RarefyError, match=match):
            load_thresholds(p, m)

    broken(lambda d: d.update(criterion="random"), "unknown criterion 'random'")
    broken(lambda d: d.update(version=2), "version 2 files use the magnitude criterion only")
    broken(lambda d: d.update(version=4), "version 4")
    other = _model(seed=1)  # same shapes, other weights
    broken(lambda d: None, "weighted criterion on other weights", m=other)
    # a version 2 file (no criterion key) loads as magnitude
    d = json.loads(json.dumps(saved))
    d.update(version=2)
    d.pop("criterion")
    p = tmp_path / "v2.json"
    p.write_text(json.dumps(d))
    assert load_thresholds(p, model).criterion == "magnitude"
    with pytest.raises(RarefyError, match="unknown activation sparsity criterion 'bogus'"):
        calibrate_thresholds(model, _tokens(1000, 5), [0.4], seq_len=64, samples=2, criterion="bogus")
    with pytest.raises(RarefyError, match="unknown activation sparsity criterion"):
        with sparsify_activations(model, LevelRule("threshold", th.rule(0.4).params, "bogus")):
            pass
    with pytest.raises(RarefyError, match="no calibration statistics for the weighted criterion"):
        calibrate_from_statistics(model, collect_statistics(model, _tokens(1000, 5), seq_len=64, samples=1),
                                  [0.4], criterion="weighted")
