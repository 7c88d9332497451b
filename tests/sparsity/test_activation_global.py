"""Global allocation across layers from output-KL sensitivity curves."""

from __future__ import annotations

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.activation import (calibrate_from_statistics, collect_statistics, input_weights,
                                        load_thresholds, save_thresholds, sparsify_activations, sparsity_report)
from rarefy.sparsity.activation_global import _hull, allocate, fisher_curves, sensitivity_curves

from test_activation import _held_out, _model, _tokens


def test_hull_and_allocation_on_known_curves():
    assert _hull([(0, 0), (1, 5), (2, 1), (3, 9)]) == [(0, 0), (2, 1), (3, 9)]
    grid = [0.25, 0.5, 0.75]
    curves = {"cheap": [0.0, 0.01, 0.02], "costly": [1.0, 2.0, 3.0], "kink": [0.1, 0.1, 5.0]}
    w = {"cheap": 1, "costly": 1, "kink": 2}
    s = allocate(curves, grid, w, 0.5)
    assert sum(w[n] * v for n, v in s.items()) / sum(w.values()) == pytest.approx(0.5)
    assert s["cheap"] == pytest.approx(0.75) and s["kink"] == pytest.approx(0.5) and s["costly"] == pytest.approx(
        0.25)  # cheapest per gated weight first; the kink's hull reaches 0.5 at cost 0.1
    assert allocate(curves, grid, w, 0.0) == {n: 0.0 for n in curves}
    with pytest.raises(RarefyError, match="could not reach"):
        allocate(curves, grid, w, 0.8)


@pytest.mark.parametrize("criterion,method", [("magnitude", "kl"), ("weighted", "fisher")])
def test_global_allocation_hits_the_average_and_held_out_sparsity(criterion, method):
    torch.set_num_threads(1)
    model = _model()
    data = collect_statistics(model, _tokens(4000, 1), seq_len=128, samples=16, keep_windows=1,
                              criteria=(criterion,))
    th = calibrate_from_statistics(model, data, [0.25, 0.5], "threshold", criterion=criterion, allocation="global",
                                   global_grid=(0.2, 0.4, 0.6, 0.8), global_method=method)
    assert th.allocation == "global" and th.calibration["global"]["grid"] == [0.2, 0.4, 0.6, 0.8]
    assert th.calibration["global"]["method"] == method
    w = input_weights(model)
    for s in (0.25, 0.5):
        per_input = th.sparsity_of_inputs(s)
        assert sum(w[n] * v for n, v in per_input.items()) / sum(w.values()) == pytest.approx(s, abs=1e-9)
        assert len({round(v, 6) for v in per_input.values()}) > 1  # not uniform
        pred = th.greedy["predicted_cost"][f"{s:.4f}"]
        assert pred["global"] <= pred["uniform"] + 1e-12  # the optimum of the additive model
        with torch.no_grad(), sparsify_activations(model, th.rule(s)) as counts:
            model(_held_out())
        report = sparsity_report(counts, model)
        assert abs(report["weighted"] - s) < 0.02, (s, report)


def test_fisher_estimate_follows_the_measured_kl():
    torch.set_num_threads(1)
    model = _model()
    data = collect_statistics(model, _tokens(3000, 1), seq_len=128, samples=8, keep_windows=1)
    grid = (0.2, 0.4, 0.6, 0.8)
    exact = sensitivity_curves(model, data, "topk", data.stats, None, grid)
    approx = fisher_curves(model, data, "topk", data.stats, None, grid, samples=8)
    for name in exact:
        for k in (2, 3):  # where the costs are large enough to compare
            assert 0.5 < approx[name][k] / exact[name][k] < 2.0, (name, exact[name], approx[name])
    # the ranking of the inputs at the largest grid point is kept
    order = sorted(exact, key=lambda n: exact[n][3])
    assert sorted(exact, key=lambda n: approx[n][3])[-2:] == order[-2:]


def test_refined_global_allocation_at_its_operating_point():
    """refine=1: each target's curves re-estimated with the model sparsified by its first
    allocation; the average is still the target."""
    torch.set_num_threads(1)
    model = _model()
    data = collect_statistics(model, _tokens(3000, 1), seq_len=128, samples=8, keep_windows=1)
    kw = {"allocation": "global", "global_grid": (0.2, 0.4, 0.6, 0.8)}
    first = calibrate_from_statistics(model, data, [0.5], "threshold", **kw)
    refined = calibrate_from_statistics(model, data, [0.5], "threshold", global_refine=1, **kw)
    assert refined.calibration["global"]["refine"] == 1
    w = input_weights(model)
    per_input = refined.sparsity_of_inputs(0.5)
    assert sum(w[n] * v for n, v in per_input.items()) / sum(w.values()) == pytest.approx(0.5, abs=1e-9)
    assert set(per_input) == set(first.sparsity_of_inputs(0.5))
    with pytest.raises(RarefyError, match="needs --global-method fisher"):
        calibrate_from_statistics(model, data, [0.5], "threshold", global_refine=1, global_method="kl", **kw)


def test_global_file_round_trip_and_bad_input(tmp_path):
    model = _model()
    data = collect_statistics(model, _tokens(2000, 1), seq_len=64, samples=4, keep_windows=1)
    th = calibrate_from_statistics(model, data, [0.4], "topk", allocation="global", global_grid=(0.3, 0.6, 0.9))
    path = tmp_path / "g.json"
    save_thresholds(th, path)
    back = load_thresholds(path, model)
    assert back.allocation == "global" and back.rule(0.4) == th.rule(0.4)
    with pytest.raises(RarefyError, match="at most sparsity 0.6"):
        calibrate_from_statistics(model, data, [0.7], "topk", allocation="global", global_grid=(0.3, 0.6))
    with pytest.raises(RarefyError, match="grid must hold sparsities in"):
        calibrate_from_statistics(model, data, [0.4], "topk", allocation="global", global_grid=(0.5, 1.0))
    with pytest.raises(RarefyError, match="unknown sensitivity method 'exact'"):
        calibrate_from_statistics(model, data, [0.4], "topk", allocation="global", global_method="exact")
    with pytest.raises(RarefyError, match="unknown allocation 'best'"):
        calibrate_from_statistics(model, data, [0.4], "topk", allocation="best")
    with pytest.raises(RarefyError, match="needs layer inputs"):
        calibrate_from_statistics(model, collect_statistics(model, _tokens(2000, 1), seq_len=64, samples=1), [0.4],
                                  allocation="global")


def test_global_match_hits_the_measured_sparsity():
    """--global-match moves the nominal average until the sparsity measured with upstream
    inputs sparsified is the target, on the calibration windows and on held-out text."""
    from rarefy.sparsity.activation_global import measured_sparsity_of

    torch.set_num_threads(1)
    model = _model(layers=3)
    data = collect_statistics(model, _tokens(4000, 1), seq_len=128, samples=16, keep_windows=2)
    kw = {"allocation": "global", "global_grid": (0.2, 0.4, 0.6, 0.8)}
    plain = calibrate_from_statistics(model, data, [0.5], "threshold", **kw)
    matched = calibrate_from_statistics(model, data, [0.5], "threshold", global_match=3, **kw)
    log = matched.calibration["global"]["match"]["0.5000"]
    assert len(log) == 3 and log[0][0] == 0.5
    miss = [abs(measured_sparsity_of(model, data, "threshold", data.stats, None, th.sparsity_of_inputs(0.5)) - 0.5)
            for th in (plain, matched)]
    assert miss[1] <= miss[0] and miss[1] < 0.005, miss
    with torch.no_grad(), sparsify_activations(model, matched.rule(0.5)) as counts:
        model(_held_out())
    assert abs(sparsity_report(counts, model)["weighted"] - 0.5) < 0.02
