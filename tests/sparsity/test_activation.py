"""Activation sparsity: threshold / topk / adaptive rules, held-out sparsity, file v1 and v2,
bad input."""

from __future__ import annotations

import json

import pytest
import torch

from rarefy.config import ModelConfig
from rarefy.errors import RarefyError
from rarefy.models.llama import DecoderLM
from rarefy.sparsity.activation import (LevelRule, Thresholds, calibrate_thresholds, input_weights, load_thresholds,
                                        measured_sparsity, save_thresholds, sparsify_activations, sparsity_report)
from rarefy.sparsity.activation_modes import apply_rule, effective_count, topk_count


def _model(layers=2, hidden=64, seed=0):
    cfg = ModelConfig(model_type="llama", vocab_size=300, hidden_size=hidden, intermediate_size=160,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(seed)
    m = DecoderLM(cfg)
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    m.rotary.build(torch.device("cpu"))
    return m.eval()


def _tokens(n, seed):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _held_out():
    return torch.tensor([_tokens(128, 2), _tokens(128, 3)])  # same window length as calibration


def test_thresholds_reach_target_sparsity_on_held_out():
    model = _model()
    th = calibrate_thresholds(model, _tokens(4000, 1), [0.25, 0.4, 0.5], seq_len=128, samples=16)
    for s in (0.25, 0.4, 0.5):
        with torch.no_grad(), sparsify_activations(model, th.for_sparsity(s)) as counts:
            model(_held_out())
        report = sparsity_report(counts, model)
        assert abs(report["entries"] - s) < 0.02 and abs(report["weighted"] - s) < 0.02, (s, report)
        per_input = [c[0] / c[1] for c in counts.values()]
        # uniform: every input near s. The attention output drifts a few points above its
        # target once q/k/v inputs are sparsified (thresholds come from dense activations)
        assert all(abs(v - s) < 0.08 for v in per_input), per_input


def _seen_inputs(model):
    """Hooks on every projection recording the input it actually reads."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for owner in (layer.self_attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                mod = getattr(owner, name, None)
                if mod is not None:
                    handles.append(mod.register_forward_pre_hook(
                        lambda m, a, key=f"{i}.{name}": seen.__setitem__(key, a[0].detach().clone())))
    return seen, handles


def test_topk_keeps_exactly_k_per_token_in_every_projection():
    x = torch.randn(3, 7, 50)
    y, dropped = apply_rule("topk", 0.3, x)
    k = topk_count(0.3, 50)
    assert k == 15 and ((y != 0).sum(-1) == k).all() and dropped == (50 - k) * 21
    kept = y.abs().masked_fill(y == 0, float("inf")).min(-1).values  # smallest kept >= largest dropped
    dropped_max = x.abs().masked_fill(y != 0, 0).max(-1).values
    assert (kept >= dropped_max).all()

    model = _model()
    th = calibrate_thresholds(model, _tokens(1000, 4), [0.4], seq_len=64, samples=2, mode="topk")
    with torch.no_grad(), sparsify_activations(model, th.rule(0.4)) as counts:
        seen, handles = _seen_inputs(model)  # registered after the sparsifying hooks: runs after them
        model(_held_out())
        for h in handles:
            h.remove()
    for key, x in seen.items():  # q, k and v (gate and up) all read the sparsified input
        width = x.shape[-1]
        assert ((x != 0).sum(-1) == round(0.6 * width)).all(), key
    for name, (zero, total) in counts.items():
        width = 64 if name.endswith(("attn_in", "o_in", "mlp_in")) else 160
        assert zero == total // width * (width - round(0.6 * width)), name
    assert abs(measured_sparsity(counts, input_weights(model)) - 0.4) < 0.01


def test_adaptive_reaches_target_on_held_out_and_varies_per_token():
    model = _model()
    th = calibrate_thresholds(model, _tokens(4000, 1), [0.25, 0.4, 0.5], seq_len=128, samples=16, mode="adaptive")
    assert th.mode == "adaptive" and th.thresholds == {}
    for s in (0.25, 0.4, 0.5):
        with torch.no_grad(), sparsify_activations(model, th.rule(s)) as counts:
            model(_held_out())
        report = sparsity_report(counts, model)
        assert abs(report["weighted"] - s) < 0.02 and abs(report["entries"] - s) < 0.02, (s, report)
    # k follows the entropy: a peaked token keeps fewer channels than a flat one
    x = torch.ones(2, 64)
    x[0, :4] = 50.0
    assert effective_count(x)[0] < effective_count(x)[1] == pytest.approx(64)
    y, _ = apply_rule("adaptive", 0.5, x)
    assert (y[0] != 0).sum() < (y[1] != 0).sum() == 32


@pytest.mark.parametrize("mode", ["threshold", "topk", "adaptive"])
def test_zero_sparsity_changes_nothing_and_hooks_are_removed(mode):
    model = _model()
    ids = torch.tensor([_tokens(64, 3)])
    th = calibrate_thresholds(model, _tokens(1000, 4), [0.0, 0.5], seq_len=64, samples=4, mode=mode)
    with torch.no_grad():
        ref = model(ids)
        with sparsify_activations(model, th.rule(0.0)) as counts:
            same = model(ids)
        with sparsify_activations(model, th.rule(0.5)):
            changed = model(ids)
        after = model(ids)
    assert torch.equal(same, ref) and measured_sparsity(counts) == 0.0
    assert not torch.allclose(changed, ref, atol=1e-3)
    assert torch.equal(after, ref)


def test_fused_projections_see_the_same_sparsity():
    model = _model()
    th = calibrate_thresholds(model, _tokens(1000, 4), [0.5], seq_len=64, samples=2, mode="topk")
    ids = _held_out()
    with torch.no_grad(), sparsify_activations(model, th.rule(0.5)) as c1:
        ref = model(ids)
    model.fuse_projections()
    with torch.no_grad(), sparsify_activations(model, th.rule(0.5)) as c2:
        fused = model(ids)
    assert torch.allclose(fused, ref, atol=1e-4) and c1 == c2


@pytest.mark.parametrize("mode", ["threshold", "topk", "adaptive"])
def test_file_round_trip_v2(tmp_path, mode):
    model = _model()
    th = calibrate_thresholds(model, _tokens(1000, 5), [0.25, 0.4], seq_len=64, samples=4, mode=mode)
    path = tmp_path / "thresholds.json"
    save_thresholds(th, path)
    data = json.loads(path.read_text())
    assert data["version"] == 3 and data["mode"] == mode and data["allocation"] == "uniform"
    assert data["criterion"] == "magnitude"
    assert data["input_sparsity"]["0.4000"]["1.down_in"] == 0.4
    assert data["inputs"]["0.mlp_in"] == {"width": 64, "weights": 2 * 64 * 160}
    back = load_thresholds(path, model)
    assert (back.mode, back.allocation, back.sparsities) == (mode, "uniform", [0.25, 0.4])
    for s in (0.25, 0.4):
        assert back.rule(s) == th.rule(s)
        assert back.sparsity_of_inputs(s) == th.sparsity_of_inputs(s)
    if mode == "threshold":
        assert data["thresholds"]["0.4000"]["0.attn_in"] == th.for_sparsity(0.4)["0.attn_in"]
        assert back.for_sparsity(0.4) == th.for_sparsity(0.4)
    else:
        assert "thresholds" not in data
        with pytest.raises(RarefyError, match=f"{mode} mode: it has no thresholds"):
            back.for_sparsity(0.4)
    if mode == "topk":
        assert data["keep_fraction"]["0.2500"]["0.o_in"] == 0.75


def test_file_version_1_still_loads(tmp_path):
    model = _model()
    th = calibrate_thresholds(model, _tokens(1000, 5), [0.4], seq_len=64, samples=4)
    v1 = {"format": "rarefy-activation-thresholds", "version": 1, "mode": "threshold", "allocation": "uniform",
          "model": th.model, "sparsities": [0.4], "thresholds": th.thresholds}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    back = load_thresholds(path, model)
    assert back.version == 1 and back.mode == "threshold" and back.for_sparsity(0.4) == th.for_sparsity(0.4)
    assert back.sparsity_of_inputs(0.4) == {n: 0.4 for n in th.for_sparsity(0.4)}
    with torch.no_grad():
        with sparsify_activations(model, back.rule(0.4)):
            a = model(_held_out())
        with sparsify_activations(model, th.for_sparsity(0.4)):  # a plain dict still works
            b = model(_held_out())
    assert torch.equal(a, b)


def test_save_load_and_bad_input(tmp_path):
    model = _model()
    th = calibrate_thresholds(model, _tokens(1000, 5), [0.4], seq_len=64, samples=4)
    path = tmp_path / "thresholds.json"
    save_thresholds(th, path)
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]  # no temporary left
    back = load_thresholds(path, model)
    assert back.for_sparsity(0.4) == th.for_sparsity(0.4)
    with pytest.raises(RarefyError, match="another model"):
        load_thresholds(path, _model(layers=3))
    with pytest.raises(RarefyError, match="no thresholds for sparsity"):
        back.for_sparsity(0.5)
    with pytest.raises(RarefyError, match=r"\[0, 1\)"):
        calibrate_thresholds(model, _tokens(1000, 5), [1.0], seq_len=64, samples=2)
    with pytest.raises(RarefyError, match=r"\[0, 1\)"):
        calibrate_thresholds(model, _tokens(1000, 5), [-0.1], seq_len=64, samples=2)
    with pytest.raises(RarefyError, match="need more than"):
        calibrate_thresholds(model, _tokens(10, 5), [0.4], seq_len=64, samples=2)
    with pytest.raises(RarefyError, match="unknown activation sparsity mode 'bogus'"):
        calibrate_thresholds(model, _tokens(1000, 5), [0.4], seq_len=64, samples=2, mode="bogus")
    with pytest.raises(RarefyError, match="unknown activation sparsity mode"):
        with sparsify_activations(model, LevelRule("bogus", th.for_sparsity(0.4))):
            pass
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(RarefyError, match="not a rarefy threshold file"):
        load_thresholds(tmp_path / "bad.json")
    with pytest.raises(RarefyError, match="lack"):
        with sparsify_activations(model, {"0.attn_in": 0.1}):
            pass
    with pytest.raises(RarefyError, match="lacks"):
        with sparsify_activations(model, {**th.for_sparsity(0.4), "7.attn_in": 0.1}):
            pass

    good = json.loads(path.read_text())

    def broken(edit, match, with_model=True):
        data = json.loads(json.dumps(good))
        edit(data)
        p = tmp_path / "broken.json"
        p.write_text(json.dumps(data))
        with pytest.raises(RarefyError, match=match):
            load_thresholds(p, model if with_model else None)

    broken(lambda d: d.update(version=4), "version 4")
    broken(lambda d: d.update(mode="bogus"), "unknown mode 'bogus'")
    broken(lambda d: d.update(allocation="random"), "unknown allocation")
    broken(lambda d: d.update(mode="topk"), "topk mode needs 'keep_fraction'")
    broken(lambda d: d.update(sparsities=[1.5]), r"\[0, 1\)")
    broken(lambda d: d.update(sparsities=[0.5]), "one entry per sparsity")
    broken(lambda d: d["thresholds"]["0.4000"].update({"0.o_in": -1}), "must be >= 0")
    broken(lambda d: d["thresholds"]["0.4000"].update({"0.o_in": "x"}), "finite number")
    broken(lambda d: d["thresholds"]["0.4000"].pop("1.down_in"), "input_sparsity and thresholds name different")
    broken(lambda d: d["inputs"]["1.down_in"].update(width=99), "mismatched shapes")
    broken(lambda d: d["input_sparsity"]["0.4000"].update({"0.o_in": 1.0}), r"input sparsity must be in \[0, 1\)")
    broken(lambda d: d.pop("sparsities"), "malformed")
    broken(lambda d: d.update(model={}, thresholds={"0.4000": {"0.attn_in": 0.1}},
                              input_sparsity={"0.4000": {"0.attn_in": 0.4}}, inputs={}), "another model")


def test_thresholds_class_defaults_keep_the_old_constructor():
    th = Thresholds([0.5], {"0.5000": {"0.attn_in": 0.2}})
    assert th.mode == "threshold" and th.for_sparsity(0.5) == {"0.attn_in": 0.2}
    assert th.rule(0.5) == LevelRule("threshold", {"0.attn_in": 0.2})
