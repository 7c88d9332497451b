"""Greedy block-wise allocation of activation sparsity (TEAL-style)."""

from __future__ import annotations

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.activation import (INPUT_NAMES, calibrate_from_statistics, calibrate_thresholds,
                                        collect_statistics, input_weights, load_thresholds, save_thresholds,
                                        sparsify_activations, sparsity_report)

from test_activation import _model, _tokens  # the same tiny model and token helper

TARGETS = [0.25, 0.5]


@pytest.fixture(scope="module")
def calibrated():
    # many tiny matmuls: one thread is faster (and much faster on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _calibrate()
    finally:
        torch.set_num_threads(threads)


def _calibrate():
    model = _model()
    ids = _tokens(3000, 1)
    data = collect_statistics(model, ids, seq_len=64, samples=8, keep_windows=2)
    out = {}
    for mode in ("threshold", "topk", "adaptive"):
        out[mode] = (calibrate_from_statistics(model, data, TARGETS, mode, greedy=True, greedy_step=0.1,
                                               greedy_tokens=96),
                     calibrate_from_statistics(model, data, TARGETS, mode))
    return model, ids, data, out


@pytest.mark.parametrize("mode", ["threshold", "topk", "adaptive"])
def test_greedy_layer_average_is_the_target(calibrated, mode):
    model, _, _, out = calibrated
    greedy, _ = out[mode]
    assert greedy.allocation == "greedy" and greedy.mode == mode
    weights = input_weights(model)
    for s in TARGETS:
        per_input = greedy.sparsity_of_inputs(s)
        for layer in range(2):
            names = [f"{layer}.{n}" for n in INPUT_NAMES]
            avg = sum(weights[n] * per_input[n] for n in names) / sum(weights[n] for n in names)
            assert avg == pytest.approx(s, abs=1e-6), (s, layer, [per_input[n] for n in names])
        if greedy.greedy["uniform_kept"][f"{s:.4f}"] == 0:
            assert len(set(per_input.values())) > 1  # not uniform
        if mode == "topk":
            assert greedy.rule(s).params == {n: pytest.approx(1 - v) for n, v in per_input.items()}


@pytest.mark.parametrize("mode", ["threshold", "topk", "adaptive"])
def test_greedy_error_is_at_most_uniform_on_calibration_data(calibrated, mode):
    model, ids, data, out = calibrated
    greedy, uniform = out[mode]
    for s in TARGETS:
        errs = greedy.greedy["error"][f"{s:.4f}"]
        assert all(g <= u * (1 + 1e-6) for g, u in zip(errs["greedy"], errs["uniform"])), errs
    # end to end on the calibration windows: output error and reached sparsity
    windows = torch.tensor([ids[i * 64:(i + 1) * 64] for i in range(4)])
    with torch.no_grad():
        ref = model(windows)
        for s in TARGETS:
            res = {}
            for name, th in (("greedy", greedy), ("uniform", uniform)):
                with sparsify_activations(model, th.rule(s)) as counts:
                    y = model(windows)
                res[name] = float((y - ref).norm() / ref.norm())
                report = sparsity_report(counts, model)
                assert abs(report["weighted"] - s) < 0.03, (mode, name, s, report)
            assert res["greedy"] <= res["uniform"], (mode, s, res)


def test_greedy_file_round_trip_and_bad_options(tmp_path, calibrated):
    model, ids, data, out = calibrated
    greedy, _ = out["topk"]
    path = tmp_path / "g.json"
    save_thresholds(greedy, path)
    back = load_thresholds(path, model)
    assert back.allocation == "greedy" and back.calibration["greedy"]["step"] == 0.1
    for s in TARGETS:
        assert back.rule(s) == greedy.rule(s) and back.sparsity_of_inputs(s) == greedy.sparsity_of_inputs(s)
    with pytest.raises(RarefyError, match="at most sparsity 0.99"):
        calibrate_thresholds(model, ids, [0.995], seq_len=64, samples=2, greedy=True)
    with pytest.raises(RarefyError, match="greedy step"):
        calibrate_thresholds(model, ids, [0.5], seq_len=64, samples=2, greedy=True, greedy_step=0.0)
    with pytest.raises(RarefyError, match="needs layer inputs"):
        calibrate_from_statistics(model, collect_statistics(model, ids, seq_len=64, samples=1), [0.5], greedy=True)


def test_greedy_on_sparse_upstream_inputs(calibrated):
    """upstream="sparse": one search per target on inputs carried through the sparsified earlier
    layers; the layer averages still hit the targets, and layer 0 (dense input either way)
    gets the same allocation as the dense-input search."""
    model, ids, data, out = calibrated
    th = calibrate_from_statistics(model, data, TARGETS, "topk", greedy=True, greedy_step=0.1, greedy_tokens=96,
                                   greedy_upstream="sparse")
    assert th.calibration["greedy"]["upstream"] == "sparse"
    weights = input_weights(model)
    dense_input = out["topk"][0]
    for s in TARGETS:
        per_input = th.sparsity_of_inputs(s)
        for layer in range(2):
            names = [f"{layer}.{n}" for n in INPUT_NAMES]
            avg = sum(weights[n] * per_input[n] for n in names) / sum(weights[n] for n in names)
            assert avg == pytest.approx(s, abs=1e-6)
        assert {n: v for n, v in per_input.items() if n.startswith("0.")} == pytest.approx(
            {n: v for n, v in dense_input.sparsity_of_inputs(s).items() if n.startswith("0.")})
    with pytest.raises(RarefyError, match="greedy upstream must be one of dense, sparse"):
        calibrate_from_statistics(model, data, TARGETS, "topk", greedy=True, greedy_upstream="random")
