"""Refining an allocation with the measured output KL at its operating point."""

from __future__ import annotations

import pytest
import torch
from test_activation import _model, _tokens

from rarefy.errors import RarefyError
from rarefy.sparsity.activation import (
    calibrate_from_statistics,
    collect_statistics,
    input_weights,
)
from rarefy.sparsity.activation_refine import groups_of, refine_measured


def test_groups_by_kind_and_layer_block():
    names = [f"{i}.{k}" for i in range(5) for k in ("attn_in", "down_in")]
    g = groups_of(names, 2)
    assert g["0.attn_in"] == ["0.attn_in", "1.attn_in"] and g["2.down_in"] == ["4.down_in"]
    assert sum(len(v) for v in g.values()) == len(names)
    with pytest.raises(RarefyError, match="block"):
        groups_of(names, 0)


def test_refinement_keeps_the_average_and_lowers_the_measured_kl():
    torch.set_num_threads(1)
    model = _model(layers=4)
    data = collect_statistics(model, _tokens(4000, 1), seq_len=128, samples=16, keep_windows=2)
    th = calibrate_from_statistics(model, data, [0.5], "threshold", allocation="global",
                                   global_grid=(0.2, 0.4, 0.6, 0.8))
    w = input_weights(model)
    start = th.sparsity_of_inputs(0.5)
    new, log = refine_measured(model, data, "threshold", data.stats, None, start, w, rounds=2, block=2,
                               windows=2, tokens=None, hi=0.8)
    assert sum(w[n] * v for n, v in new.items()) / sum(w.values()) == pytest.approx(0.5, abs=1e-9)
    assert all(0.0 <= v <= 0.8 for v in new.values())
    assert log[-1]["final_kl"] <= log[0]["kl"]  # a round is kept only if the measured KL falls
    assert new != start
    with pytest.raises(RarefyError, match="rounds"):
        refine_measured(model, data, "threshold", data.stats, None, start, w, rounds=-1)
