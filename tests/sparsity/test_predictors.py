"""Neuron predictors (kinds swiglu and linear): shapes, labels, training, exact sparsity, save/load, ahead,
bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rarefy.config import ModelConfig
from rarefy.errors import RarefyError
from rarefy.models.llama import DecoderLM
from rarefy.sparsity.predictor_training import (_fit_layer, collect_mlp_inputs, fit_predictors, label_threshold,
                                                make_labels, recall_precision, train_predictors)
from rarefy.sparsity.predictors import (DEFAULT_KIND, LowRankPredictor, SwiGLUPredictor, default_rank, kept_neurons,
                                        load_predictors, mlp_activations, mlp_gate_up_weights, neuron_sparsity,
                                        new_predictors, oracle_mlp_sparsity, predict_mask, predicted_mlp_sparsity,
                                        predictor_params, topk_mask)


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
    # kind swiglu: 2 r (d + f) <= 15% of 3 d f, a multiple of 8
    assert default_rank(1536, 576, "swiglu") == 88 and default_rank(11008, 4096, "swiglu") == 664
    assert default_rank(160, 64, "swiglu") == 8 and default_rank(64, 8, "swiglu") == 8
    for d, f in ((576, 1536), (4096, 11008), (2048, 8192)):
        r = default_rank(f, d, "swiglu")
        assert 0.13 < 2 * r * (d + f) / (3 * d * f) <= 0.15
    assert predictor_params("swiglu", 88, 576, 1536) == 2 * (88 * 2112 + 1536)
    assert kept_neurons(160, 0.5) == 80 and kept_neurons(1536, 0.4) == 922 and kept_neurons(10, 0.99) == 1
    assert DEFAULT_KIND == "swiglu"
    p = new_predictors(model, 0.5, kind="linear")
    assert p.rank == 8 and p.num_layers == 2 and p.keep == 80 and p.kind == "linear"
    assert p.nets[0].inp.weight.shape == (8, 64) and p.nets[0].out.weight.shape == (160, 8)
    q = new_predictors(model, 0.5)
    assert q.kind == "swiglu" and q.rank == 8 and isinstance(q.nets[0], SwiGLUPredictor)
    assert q.nets[0].gate_b.weight.shape == (8, 64) and q.nets[0].up_a.weight.shape == (160, 8)
    x = torch.randn(3, 5, 64)
    for pr in (p, q):
        m = predict_mask(pr, 1, x)
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
    untrained = fit_predictors(model, data, 0.5, epochs=0, kind="linear")
    trained = fit_predictors(model, data, 0.5, epochs=30, lr=1e-2, batch_size=128, kind="linear")
    assert len(trained.recall) == len(trained.precision) == 2
    assert min(trained.recall) > max(untrained.recall) + 0.05, (untrained.recall, trained.recall)
    assert trained.thresholds is not None and len(trained.thresholds) == 2
    ids = torch.tensor([_tokens(64, 7), _tokens(64, 8)])
    for s, kind in ((0.25, "linear"), (0.5, "linear"), (0.7, "linear"), (0.5, "swiglu"), (0.7, "swiglu")):
        p = fit_predictors(model, data, s, epochs=1, kind=kind)
        with torch.no_grad(), predicted_mlp_sparsity(model, p) as counts:
            model(ids)
        assert neuron_sparsity(counts) == pytest.approx(round(s * 160) / 160)
        assert all(c[1] == 2 * 64 * 160 for c in counts.values())


@pytest.mark.parametrize("kind", ["linear", "swiglu"])
def test_predicted_mask_is_applied_and_hooks_removed(model, data, kind):
    ids = torch.tensor([_tokens(32, 9)])
    p = fit_predictors(model, data, 0.0, epochs=1, kind=kind)
    with torch.no_grad():
        ref = model(ids)
        with predicted_mlp_sparsity(model, p) as counts:
            same = model(ids)
        assert neuron_sparsity(counts) == 0.0
        assert torch.allclose(same, ref, atol=1e-6)
        # the context equals a hand-written masked MLP
        p = fit_predictors(model, data, 0.6, epochs=1, kind=kind)
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


@pytest.mark.parametrize("kind", ["linear", "swiglu"])
def test_ahead_reads_previous_layer_input(model, data, monkeypatch, kind):
    import rarefy.sparsity.predictors as mod
    p = fit_predictors(model, data, 0.5, ahead=True, epochs=1, kind=kind)
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


@pytest.mark.parametrize("kind", ["linear", "swiglu"])
def test_save_load_round_trip(model, data, tmp_path, kind):
    p = fit_predictors(model, data, 0.4, rank=16, ahead=True, mode="topk", epochs=1, kind=kind)
    out = p.save(tmp_path / "pred")
    meta = json.loads((out / "predictors.json").read_text())
    assert meta["format"] == "rarefy-neuron-predictors" and meta["version"] == 2 and meta["kind"] == kind
    assert meta["model"] == {"num_layers": 2, "hidden_size": 64, "intermediate_size": 160}
    assert (meta["rank"], meta["sparsity"], meta["ahead"], meta["mode"]) == (16, 0.4, True, "topk")
    assert meta["params_per_layer"] == predictor_params(kind, 16, 64, 160)
    assert len(meta["recall"]) == 2 and len(meta["precision"]) == 2
    back = load_predictors(out, model)
    assert (back.rank, back.sparsity, back.ahead, back.mode, back.keep) == (16, 0.4, True, "topk", p.keep)
    assert back.kind == kind and back.recall == p.recall
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
    with pytest.raises(RarefyError, match="rank"):
        fit_predictors(model, data, 0.5, rank=65, kind="linear")
    for bad in ("bogus", "relu", None):
        with pytest.raises(RarefyError, match="kind"):
            fit_predictors(model, data, 0.5, kind=bad)
        with pytest.raises(RarefyError, match="kind"):
            new_predictors(model, 0.5, kind=bad)
    with pytest.raises(RarefyError, match="epochs"):
        fit_predictors(model, data, 0.5, epochs=-1)
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


# -- kind swiglu -------------------------------------------------------------------------

def test_gate_up_weights_read_back(model):
    for fuse in (False, True):
        m = _model(fuse=fuse)
        mlp = m.model.layers[1].mlp
        wg, wu, bg, bu = mlp_gate_up_weights(mlp)
        ref = model.model.layers[1].mlp
        assert torch.equal(wg.float(), ref.gate_proj.weight) and torch.equal(wu.float(), ref.up_proj.weight)
        assert not bg.any() and not bu.any()


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_swiglu_full_rank_is_the_oracle(model, data, mode):
    """At rank = hidden the estimates are gate(x) and up(x) themselves: the oracle mask."""
    for p in (fit_predictors(model, data, 0.5, rank=64, mode=mode, kind="swiglu"),
              new_predictors(model, 0.5, rank=64, mode=mode, kind="swiglu")):
        for i in range(2):
            x = data.held[i]
            want = topk_mask(mlp_activations(model.model.layers[i].mlp, x), p.keep)
            assert torch.equal(predict_mask(p, i, x), want)
    p = fit_predictors(model, data, 0.5, rank=64, mode="topk", kind="swiglu")
    assert p.recall == [1.0, 1.0] and p.precision == [1.0, 1.0]
    ids = torch.tensor([_tokens(48, 11)])
    with torch.no_grad():
        with predicted_mlp_sparsity(model, p) as c1:
            got = model(ids)
        with oracle_mlp_sparsity(model, 0.5) as c2:
            want = model(ids)
    assert torch.allclose(got, want, atol=1e-5) and c1 == c2


@pytest.mark.parametrize("ahead", [False, True])
def test_swiglu_beats_linear_at_low_rank(model, data, ahead):
    for rank in (8, 16):
        sw = fit_predictors(model, data, 0.5, rank=rank, ahead=ahead, kind="swiglu")
        lin = fit_predictors(model, data, 0.5, rank=rank, ahead=ahead, kind="linear", epochs=30, lr=1e-2,
                             batch_size=128)
        assert min(sw.recall) > max(lin.recall) + 0.03, (rank, sw.recall, lin.recall)
        assert min(sw.precision) > max(lin.precision) + 0.03


def test_swiglu_whitening_beats_plain_svd(model, data):
    """The whitened SVD minimises the output error on calibration inputs; the plain one does not."""
    white = fit_predictors(model, data, 0.5, rank=8, kind="swiglu")
    plain = new_predictors(model, 0.5, rank=8, kind="swiglu")
    for i in range(2):
        x = data.held[i]
        mlp = model.model.layers[i].mlp
        wg, _, _, _ = mlp_gate_up_weights(mlp)
        true = x.double() @ wg.T
        err = [float(((p.nets[i].gate_a(p.nets[i].gate_b(x))).double() - true).pow(2).mean())
               for p in (white, plain)]
        assert err[0] < err[1], err


def test_swiglu_finetune_runs_and_keeps_exact_sparsity(model, data):
    p0 = fit_predictors(model, data, 0.5, rank=8, kind="swiglu", epochs=0)
    p1 = fit_predictors(model, data, 0.5, rank=8, kind="swiglu", epochs=3, lr=1e-3)
    assert p0.training["epochs"] == 0 and p1.training["epochs"] == 3
    assert all(l == l for l in p1.training["final_loss"])  # finite, not nan
    assert not torch.equal(p0.nets[0].gate_a.weight, p1.nets[0].gate_a.weight)
    assert all(r > 0.5 for r in p1.recall)
    x = data.held[1]
    assert (predict_mask(p1, 1, x).sum(-1) == p1.keep).all()


def test_version_1_files_load_as_linear(model, data, tmp_path):
    p = fit_predictors(model, data, 0.5, rank=8, epochs=1, kind="linear")
    out = p.save(tmp_path / "v1")
    meta = json.loads((out / "predictors.json").read_text())
    for k in ("kind", "params_per_layer", "cost_vs_mlp"):
        del meta[k]
    meta["version"] = 1
    (out / "predictors.json").write_text(json.dumps(meta))
    back = load_predictors(out, model)
    assert back.kind == "linear"
    x = torch.randn(7, 64)
    assert torch.equal(predict_mask(back, 1, x), predict_mask(p, 1, x))
    meta["version"] = 3
    (out / "predictors.json").write_text(json.dumps(meta))
    with pytest.raises(RarefyError, match="version 3"):
        load_predictors(out, model)
    meta["version"], meta["kind"] = 2, "relu"
    (out / "predictors.json").write_text(json.dumps(meta))
    with pytest.raises(RarefyError, match="kind"):
        load_predictors(out, model)
    # a swiglu file whose weights are linear ones is refused as corrupt
    meta["kind"] = "swiglu"
    (out / "predictors.json").write_text(json.dumps(meta))
    with pytest.raises(RarefyError, match="corrupt"):
        load_predictors(out, model)
