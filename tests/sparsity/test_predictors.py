"""Deja Vu-style neuron predictors: shapes, labels, training, exact sparsity, save/load, ahead, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rarefy.config import ModelConfig
from rarefy.errors import RarefyError
from rarefy.models.llama import DecoderLM
from rarefy.sparsity.predictors import (LowRankPredictor, _fit_layer, collect_mlp_inputs, default_rank,
                                        fit_predictors, kept_neurons, label_threshold, load_predictors,
                                        make_labels, mlp_activations, neuron_sparsity, new_predictors,
                                        oracle_mlp_sparsity, predict_mask, predicted_mlp_sparsity,
                                        recall_precision, topk_mask, train_predictors)


def _model(layers=2, hidden=64, inter=160, seed=0, fuse=False):
    cfg = ModelConfig(model_type="llama", vocab_size=300, hidden_size=hidden, intermediate_size=inter,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(seed)
    m = DecoderLM(cfg)
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    m.rotary.build(torch.device("cpu"))
    if fuse:
        m.fuse_projections()
    return m.eval()


def _tokens(n, seed):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def data(model):
    return collect_mlp_inputs(model, _tokens(64 * 16, 1), seq_len=64, samples=16, seed=0)


def test_default_rank_and_shapes(model):
    assert default_rank(1536) == 64  # 61.4 -> 64
    assert default_rank(11008) == 448  # 440.3 -> 448
    assert default_rank(160) == 8
    assert kept_neurons(160, 0.5) == 80 and kept_neurons(1536, 0.4) == 922 and kept_neurons(10, 0.99) == 1
    p = new_predictors(model, 0.5)
    assert p.rank == 8 and p.num_layers == 2 and p.keep == 80
    assert p.nets[0].inp.weight.shape == (8, 64) and p.nets[0].out.weight.shape == (160, 8)
    x = torch.randn(3, 5, 64)
    m = predict_mask(p, 1, x)
    assert m.dtype == torch.bool and m.shape == (15, 160)
    assert (m.sum(-1) == 80).all()


def test_collect_splits_windows(data, model):
    assert data.windows == (14, 2)
    assert data.train[0].shape == (14 * 64, 64) and data.held[1].shape == (2 * 64, 64)
    # held-out windows are not among the training windows
    train_rows = {tuple(r) for r in data.train[0][:, :4].tolist()}
    assert not any(tuple(r) in train_rows for r in data.held[0][:, :4].tolist())


@pytest.mark.parametrize("fuse", [False, True])
def test_labels_match_brute_force(fuse):
    model = _model(fuse=fuse)
    x = torch.randn(50, 64)
    mlp = model.model.layers[0].mlp
    acts = mlp_activations(mlp, x)
    ref = _model().model.layers[0].mlp  # same seed, unfused
    brute = torch.empty(50, 160)
    for t in range(50):
        for j in range(160):
            g = ref.gate_proj.weight[j] @ x[t]
            u = ref.up_proj.weight[j] @ x[t]
            brute[t, j] = (F.silu(g) * u).abs()
    assert torch.allclose(acts, brute, atol=1e-5)
    s = 0.4
    t_ = label_threshold(acts, s)
    lab = make_labels(acts, s, "threshold", t_)
    assert (~lab).sum().item() == round(s * acts.numel())  # exactly the s-quantile (no ties)
    assert torch.equal(lab, brute > t_)
    top = make_labels(acts, s, "topk")
    k = kept_neurons(160, s)
    for t in range(50):
        assert set(top[t].nonzero().flatten().tolist()) == set(brute[t].argsort(descending=True)[:k].tolist())
    assert make_labels(acts, 0.0, "threshold").all()


def test_training_learns_a_learnable_case():
    """Labels from a rank-4 linear function of x: trained recall far above untrained."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 4, generator=gen), torch.randn(4, 160, generator=gen)
    x = torch.randn(3000, 64, generator=gen) * torch.linspace(0.2, 5, 64) + 1.0  # unscaled, shifted
    score = x @ a @ b
    keep = kept_neurons(160, 0.5)
    lab = topk_mask(score, keep)
    xtr, ltr, xte, lte = x[:2500], lab[:2500], x[2500:], lab[2500:]
    torch.manual_seed(0)
    untrained = LowRankPredictor(64, 8, 160)
    trained = LowRankPredictor(64, 8, 160)
    trained.load_state_dict(untrained.state_dict())
    _fit_layer(trained, xtr, ltr, epochs=10, lr=1e-2, batch_size=128, gen=gen)
    with torch.no_grad():
        r0, _ = recall_precision(topk_mask(untrained(xte), keep), lte)
        r1, p1 = recall_precision(topk_mask(trained(xte), keep), lte)
    assert r0 < 0.65 and r1 > 0.9 and p1 > 0.9, (r0, r1)


def test_fit_improves_recall_and_sparsity_is_exact(model, data):
    untrained = fit_predictors(model, data, 0.5, epochs=0)
    trained = fit_predictors(model, data, 0.5, epochs=30, lr=1e-2, batch_size=128)
    assert len(trained.recall) == len(trained.precision) == 2
    assert min(trained.recall) > max(untrained.recall) + 0.05, (untrained.recall, trained.recall)
    assert trained.thresholds is not None and len(trained.thresholds) == 2
    ids = torch.tensor([_tokens(64, 7), _tokens(64, 8)])
    for s in (0.25, 0.5, 0.7):
        p = fit_predictors(model, data, s, epochs=1)
        with torch.no_grad(), predicted_mlp_sparsity(model, p) as counts:
            model(ids)
        assert neuron_sparsity(counts) == pytest.approx(round(s * 160) / 160)
        assert all(c[1] == 2 * 64 * 160 for c in counts.values())


def test_predicted_mask_is_applied_and_hooks_removed(model, data):
    ids = torch.tensor([_tokens(32, 9)])
    p = fit_predictors(model, data, 0.0, epochs=1)
    with torch.no_grad():
        ref = model(ids)
        with predicted_mlp_sparsity(model, p) as counts:
            same = model(ids)
        assert neuron_sparsity(counts) == 0.0
        assert torch.allclose(same, ref, atol=1e-6)
        # the context equals a hand-written masked MLP
        p = fit_predictors(model, data, 0.6, epochs=1)
        with predicted_mlp_sparsity(model, p):
            got = model(ids)
        layers = model.model.layers
        orig = [l.mlp.forward for l in layers]
        try:
            for i, l in enumerate(layers):
                def fwd(x, mlp=l.mlp, i=i):
                    act = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
                    mask = predict_mask(p, i, x).view(act.shape)
                    return mlp.down_proj(act * mask)
                l.mlp.forward = fwd
            want = model(ids)
        finally:
            for l, f in zip(layers, orig):
                l.mlp.forward = f
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(model(ids), ref)


def test_ahead_reads_previous_layer_input(model, data, monkeypatch):
    import rarefy.sparsity.predictors as mod
    p = fit_predictors(model, data, 0.5, ahead=True, epochs=1)
    assert p.ahead and p.source_layer(0) == 0 and p.source_layer(1) == 0
    seen = {}

    def spy(preds, i, x):
        seen[i] = x.clone()
        return predict_mask(preds, i, x)
    monkeypatch.setattr(mod, "predict_mask", spy)
    captured = {}
    hooks = [l.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].clone()))
             for i, l in enumerate(model.model.layers)]
    try:
        with torch.no_grad(), predicted_mlp_sparsity(model, p):
            model(torch.tensor([_tokens(16, 3)]))
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(seen[0], captured[0]) and torch.equal(seen[1], captured[0])
    assert not torch.equal(captured[0], captured[1])


def test_oracle_masks(model):
    ids = torch.tensor([_tokens(64, 5)])
    with torch.no_grad(), oracle_mlp_sparsity(model, 0.5) as counts:
        model(ids)
    assert neuron_sparsity(counts) == 0.5
    with torch.no_grad(), oracle_mlp_sparsity(model, 0.5, [0.0, float("inf")]) as counts:
        model(ids)
    assert counts["0.mlp_neurons"][0] == 0 and counts["1.mlp_neurons"][0] == 64 * 160


def test_save_load_round_trip(model, data, tmp_path):
    p = fit_predictors(model, data, 0.4, rank=16, ahead=True, mode="topk", epochs=1)
    out = p.save(tmp_path / "pred")
    meta = json.loads((out / "predictors.json").read_text())
    assert meta["format"] == "rarefy-neuron-predictors" and meta["version"] == 1
    assert meta["model"] == {"num_layers": 2, "hidden_size": 64, "intermediate_size": 160}
    assert (meta["rank"], meta["sparsity"], meta["ahead"], meta["mode"]) == (16, 0.4, True, "topk")
    assert len(meta["recall"]) == 2 and len(meta["precision"]) == 2
    back = load_predictors(out, model)
    assert (back.rank, back.sparsity, back.ahead, back.mode, back.keep) == (16, 0.4, True, "topk", p.keep)
    assert back.recall == p.recall
    x = torch.randn(10, 64)
    for i in range(2):
        assert torch.equal(predict_mask(back, i, x), predict_mask(p, i, x))
    # saving again replaces the directory as a whole
    p.save(out)
    assert sorted(f.name for f in out.iterdir()) == ["predictors.json", "predictors.safetensors"]


def test_bad_input(model, data, tmp_path):
    for s in (1.0, -0.1, 1.5):
        with pytest.raises(RarefyError, match=r"\[0, 1\)"):
            fit_predictors(model, data, s)
    with pytest.raises(RarefyError, match="rank"):
        fit_predictors(model, data, 0.5, rank=0)
    with pytest.raises(RarefyError, match="rank"):
        train_predictors(model, _tokens(500, 1), 0.5, rank=65, seq_len=32, samples=4)
    with pytest.raises(RarefyError, match="mode"):
        fit_predictors(model, data, 0.5, mode="bogus")
    with pytest.raises(RarefyError, match="two windows"):
        train_predictors(model, _tokens(40, 1), 0.5, seq_len=32, samples=4)
    p = fit_predictors(model, data, 0.5, epochs=1)
    out = p.save(tmp_path / "p")
    other = _model(layers=3)
    with pytest.raises(RarefyError, match="another model"):
        load_predictors(out, other)
    with pytest.raises(RarefyError, match="another model"):
        with predicted_mlp_sparsity(other, p):
            pass
    with pytest.raises(RarefyError, match="not found"):
        load_predictors(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RarefyError, match="not a rarefy predictor directory"):
        load_predictors(tmp_path / "empty")
    (out / "predictors.safetensors").write_bytes(b"garbage")
    with pytest.raises(RarefyError, match="corrupt"):
        load_predictors(out, model)


def test_train_predictors_end_to_end(model):
    p = train_predictors(model, _tokens(32 * 12, 2), 0.5, seq_len=32, samples=12, epochs=2)
    assert p.training["held_out_tokens"] == 2 * 32 and p.training["train_tokens"] == 10 * 32
    assert all(0 < r <= 1 for r in p.recall)
