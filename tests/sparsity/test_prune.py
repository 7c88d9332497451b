"""Pruning: exact masks, the three methods on one matrix, the layer-by-layer pipeline, bad input."""

import math
import random

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.models.loader import load_model
from rarefy.sparsity.calibrate import calibration_batches
from rarefy.sparsity.masks import (Pattern, block_mask, check_sparsity, nm_mask, parse_block,
                                   parse_pattern, unstructured_mask)
from rarefy.sparsity.prune import (hessian_factor, magnitude_keep, parse_sparsity_spec,
                                   prune_model, sparsegpt_prune, sparsity_for, wanda_keep)
from tests.conftest import VOCAB

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77, 0.999])
def test_unstructured_mask_exact_count(s):
    score = torch.randn(48, 40)
    assert (~unstructured_mask(score, s)).sum().item() == round(s * 48 * 40)
    per_row = ~unstructured_mask(score, s, per_row=True)
    assert (per_row.sum(1) == round(s * 40)).all()
    # the dropped entries are the lowest: every kept score >= every dropped score
    keep = unstructured_mask(score, s)
    if 0 < keep.sum() < keep.numel():
        assert score[keep].min() >= score[~keep].max()


def test_masks_exact_with_ties():
    score = torch.ones(16, 16)
    assert (~unstructured_mask(score, 0.5)).sum().item() == 128
    assert (nm_mask(score, 2, 4).view(16, 4, 4).sum(-1) == 2).all()
    assert (~block_mask(score, 0.25, 4, 4)).sum().item() == 4 * 16


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask(n, m):
    score = torch.randn(24, 64)
    keep = nm_mask(score, n, m)
    groups = keep.view(24, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    sc = score.view(24, 64 // m, m)  # kept ones are the group's n largest
    lowest_kept = sc.masked_fill(~groups, float("inf")).amin(-1)
    assert (lowest_kept >= sc.masked_fill(groups, -float("inf")).amax(-1)).all()


def test_block_mask_whole_blocks():
    score = torch.rand(32, 48)
    keep = block_mask(score, 0.6, 4, 8)
    blocks = keep.view(8, 4, 6, 8).permute(0, 2, 1, 3).reshape(48, 32)
    assert ((blocks.sum(1) == 0) | (blocks.sum(1) == 32)).all()  # each block all kept or all dropped
    assert (blocks.sum(1) == 0).sum().item() == round(0.6 * 48)


def test_parsers_and_bad_values():
    assert parse_pattern("2:4") == Pattern("nm", n=2, m=4) and parse_pattern((4, 8)).m == 8
    assert parse_block("4x8") == Pattern("block", r=4, c=8) and parse_block((16, 16)).c == 16
    for bad in ("5:4", (5, 4), "4:4", "0:4", "a:b", "2-4", "2:4:8", (2,)):
        with pytest.raises(RarefyError):
            parse_pattern(bad)
    for bad in ("4", "0x4", "ax4", (4, -1)):
        with pytest.raises(RarefyError):
            parse_block(bad)
    for bad in (1.0, -0.1, float("nan"), "abc", None):
        with pytest.raises(RarefyError):
            check_sparsity(bad)


def test_sparsity_spec():
    assert parse_sparsity_spec(0.5) == {"default": 0.5}
    spec = parse_sparsity_spec("0.3, mlp=0.6, attn=0.4, down_proj=0.7")
    assert spec == {"default": 0.3, "mlp": 0.6, "attn": 0.4, "down_proj": 0.7}
    assert sparsity_for("model.layers.1.mlp.down_proj", spec) == 0.7
    assert sparsity_for("model.layers.1.mlp.up_proj", spec) == 0.6
    assert sparsity_for("model.layers.1.self_attn.q_proj", spec) == 0.4
    assert sparsity_for("model.layers.1.other.x_proj", spec) == 0.3
    assert sparsity_for("model.layers.1.mlp.up_proj", {"attn": 0.5}) == 0.0  # unnamed: dense
    for bad in ("", "mlp=", "mlp=abc", "mlp=1.2", "mlp=0.5,mlp=0.6", "a b=0.5", "mlp:0.5", "0.5,0.6"):
        with pytest.raises(RarefyError):
            parse_sparsity_spec(bad)


# ----------------------------------------------------------------------------- one matrix

def correlated_inputs(seed, n=1024, d=128, out=64):
    """X [n, d] with correlated channels and a few 10x outlier channels (as in LLM
    activations), W [out, d] ~ N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 2 * torch.randn(d, d, generator=g) / d ** 0.5)
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=g)[: d // 16]] = 10.0
    return x * scale, 0.05 * torch.randn(out, d, generator=g)


def sparsegpt(w, x, s, pattern=Pattern(), blocksize=128, dampening=0.01):
    u, dead, _ = hessian_factor(2 * x.T @ x / x.shape[0], dampening)
    return sparsegpt_prune([w], u, dead, [s], pattern, blocksize)[0]


def rel_err(x, w, wp):
    return ((x @ w.T - x @ wp.T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_error_ordering(seed, pattern):
    # SparseGPT < Wanda < magnitude (checked on 30 seeds while writing: worst ratios
    # sparsegpt/wanda 0.89 (unstructured), 0.80 (2:4); wanda/magnitude 0.45).
    x, w = correlated_inputs(seed)
    pat = Pattern() if pattern == "unstructured" else parse_pattern(pattern)
    e_mag = rel_err(x, w, w * magnitude_keep(w, 0.5, pat))
    e_wanda = rel_err(x, w, w * wanda_keep(w, x.square().sum(0), 0.5, pat))
    e_sgpt = rel_err(x, w, sparsegpt(w, x, 0.5, pat))
    assert e_sgpt < 0.95 * e_wanda < 0.95 * 0.5 * e_mag


def naive_obs(w, x, n, m, dampening=0.01):
    """SparseGPT for N:M written from the paper with explicit inverses, in float64:
    column j dropped from row r moves -w_rj / [H_F^-1]_00 * [H_F^-1]_0,: onto the
    columns F = j.. still free."""
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    h += dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    w = w.double().clone()
    for j in range(w.shape[1]):
        hinv = torch.linalg.inv(h[j:, j:])
        if j % m == 0:
            dd = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0] for k in range(j, j + m)])
            drop = torch.zeros(w.shape[0], m, dtype=torch.bool)
            drop.scatter_(1, (w[:, j:j + m] ** 2 / dd).argsort(1)[:, : m - n], True)
        rows = drop[:, j % m]
        w[rows, j:] -= (w[rows, j] / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
        w[rows, j] = 0
    return w


def test_sparsegpt_matches_naive_obs():
    x, w = correlated_inputs(3, n=256, d=32, out=8)
    ref = naive_obs(w, x, 2, 4)
    for bs in (4, 8, 128):  # lazy block updates give the same result
        got = sparsegpt(w, x, 0.5, parse_pattern("2:4"), blocksize=bs)
        assert torch.allclose(got.double(), ref, atol=1e-4 * w.abs().max().item())
        assert torch.equal(got == 0, ref == 0)


@pytest.mark.parametrize("pattern,s", [("unstructured", 0.37), ("4:8", None), ("block", 0.6)])
def test_sparsegpt_exact_counts(pattern, s):
    x, w = correlated_inputs(0, n=512, d=192, out=40)  # 192 cols = 2 blocks of 64 + 1 of 64
    pat = {"unstructured": Pattern(), "4:8": parse_pattern("4:8"), "block": parse_block("4x8")}[pattern]
    got = sparsegpt(w, x, s if s else 0.5, pat, blocksize=64)
    if pattern == "unstructured":
        assert (got == 0).sum().item() == round(s * w.numel())
    elif pattern == "4:8":
        assert ((got != 0).view(40, 24, 8).sum(-1) == 4).all()
    else:
        blocks = (got != 0).view(10, 4, 24, 8).permute(0, 2, 1, 3).reshape(240, 32).sum(1)
        assert ((blocks == 0) | (blocks == 32)).all() and (blocks == 0).sum().item() == round(0.6 * 240)


def test_sparsegpt_sparsity_zero_is_identity():
    x, w = correlated_inputs(1)
    assert torch.equal(sparsegpt(w, x, 0.0), w)


def test_sparsegpt_stacked_equals_separate():
    # q/k/v share one Hessian and are swept together; each keeps its own count
    x, _ = correlated_inputs(2, d=64)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)
    u, dead, _ = hessian_factor(2 * x.T @ x / x.shape[0], 0.01)
    both = sparsegpt_prune([a, b], u, dead, [0.5, 0.25], Pattern(), 32)
    for w, s, got in zip((a, b), (0.5, 0.25), both):
        alone = sparsegpt_prune([w], u, dead, [s], Pattern(), 32)[0]
        assert torch.allclose(got, alone, atol=1e-5) and (got == 0).sum().item() == round(s * w.numel())


def test_dead_inputs():
    x, w = correlated_inputs(4, d=64)
    x[:, [3, 10, 40]] = 0  # inputs that never fire: H_jj = 0
    got = sparsegpt(w, x, 0.5)
    assert torch.isfinite(got).all()
    assert (got[:, [3, 10, 40]] == 0).all()
    assert (got == 0).sum().item() == round(0.5 * w.numel())
    assert rel_err(x, w, got) < rel_err(x, w, w * magnitude_keep(w, 0.5, Pattern()))
    keep = wanda_keep(w, x.square().sum(0), 0.5, Pattern())  # dead columns score 0: dropped first
    assert not keep[:, [3, 10, 40]].any() and ((~keep).sum(1) == 32).all()


def test_hessian_factor_recovers_from_singular():
    x = torch.randn(8, 32)  # rank 8 < 32: singular without dampening
    u, dead, damp = hessian_factor(2 * x.T @ x / 8, 0.0)
    assert torch.isfinite(u).all() and damp > 0 and not dead.any()


# ----------------------------------------------------------------------------- pipeline

@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    rnd = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog sparse models run fast perplexity "
             "measures how surprised a model is by text").split()
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rnd.choice(words) for _ in range(4000)))
    return str(path)


def fresh(path, dtype="fp32"):
    return load_model(path, dtype=dtype)


def linears(model):
    return {f"model.layers.{i}.{sub}": m.weight for i, layer in enumerate(model.model.layers)
            for sub, m in layer.named_modules() if sub.endswith("_proj")}


def expected_zeros(method, w, s):
    out_f, in_f = w.shape
    return out_f * round(s * in_f) if method == "wanda" else round(s * w.numel())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pipeline_prunes_every_target(method, tiny_model_dir, calib_file):
    lm, ref = fresh(tiny_model_dir), fresh(tiny_model_dir)
    rep = prune_model(lm.model, lm.tokenizer, method, sparsity=0.5, calib=calib_file,
                      calib_samples=6, calib_len=48, skip=["model.layers.1.mlp.*"], progress=False)
    got = linears(lm.model)
    assert len(rep.matrices) == 7 + 4 and sorted(rep.skipped) == sorted(
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    for name, w in got.items():
        if name in rep.skipped:
            assert torch.equal(w, linears(ref.model)[name])
        else:
            assert (w == 0).sum().item() == expected_zeros(method, w, 0.5), name
    # embeddings, lm_head, norms untouched
    for name, p in ref.model.named_parameters():
        if not name.endswith("_proj.weight"):
            assert torch.equal(p, dict(lm.model.named_parameters())[name]), name
    assert len(rep.layer_errors) == 2 and all(0 < e < 1 for e in rep.layer_errors)
    assert rep.calibration["tokens"] == 6 * 48 and abs(rep.overall_sparsity - 0.5) < 0.01
    assert torch.isfinite(lm.model(torch.randint(0, VOCAB, (1, 16)))).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("kw", [dict(pattern="2:4"), dict(block="4x8", sparsity=0.5),
                                dict(sparsity="attn=0.25,down_proj=0.75")])
def test_pipeline_patterns(method, kw, tiny_model_dir, calib_file):
    lm = fresh(tiny_model_dir)
    rep = prune_model(lm.model, lm.tokenizer, method, calib=calib_file, calib_samples=4,
                      calib_len=32, progress=False, **kw)
    for name, w in linears(lm.model).items():
        nz = w != 0
        if "pattern" in kw:
            assert (nz.view(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        elif "block" in kw:
            blocks = nz.view(w.shape[0] // 4, 4, w.shape[1] // 8, 8).sum((1, 3))
            assert ((blocks == 0) | (blocks == 32)).all()
            assert (blocks == 0).sum().item() == round(0.5 * blocks.numel()), name
        else:
            s = 0.75 if name.endswith("down_proj") else 0.25 if "self_attn" in name else 0.0
            assert (~nz).sum().item() == expected_zeros(method, w, s), name
    assert len(rep.matrices) == (10 if "sparsity" in kw and "block" not in kw else 14)


def test_calibration_propagates_through_pruned_layers(tiny_model_dir, calib_file):
    """Layer 1's Wanda statistics come from the outputs of the *pruned* layer 0."""
    lm, ref = fresh(tiny_model_dir), fresh(tiny_model_dir)
    prune_model(lm.model, lm.tokenizer, "wanda", sparsity=0.5, calib=calib_file, calib_samples=4,
                calib_len=32, seed=3, progress=False)
    batches = calibration_batches(ref.tokenizer, calib_file, 4, 32, seed=3)

    def layer1_norms(model):
        norms, hooks = {}, []
        for sub, m in model.model.layers[1].named_modules():
            if sub.endswith("_proj"):
                def hook(mod, args, out, sub=sub):
                    norms[sub] = args[0].reshape(-1, args[0].shape[-1]).float().square().sum(0)
                hooks.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(batches)
        for h in hooks:
            h.remove()
        return norms

    dense_norms = layer1_norms(ref.model)
    with torch.no_grad():
        for (_, p), (_, q) in zip(ref.model.model.layers[0].named_parameters(),
                                  lm.model.model.layers[0].named_parameters()):
            p.copy_(q)
    norms = layer1_norms(ref.model)
    differs = False
    for sub, w in ref.model.model.layers[1].named_modules():
        if sub.endswith("_proj"):
            pruned = lm.model.model.layers[1].get_submodule(sub).weight != 0
            assert torch.equal(wanda_keep(w.weight, norms[sub], 0.5, Pattern()), pruned), sub
            differs |= not torch.equal(wanda_keep(w.weight, dense_norms[sub], 0.5, Pattern()), pruned)
    assert differs  # the test would notice statistics taken from the dense model


def test_bf16_model(tiny_model_dir, calib_file):
    lm = fresh(tiny_model_dir, dtype="bf16")
    prune_model(lm.model, lm.tokenizer, "sparsegpt", pattern=(2, 4), calib=calib_file,
                calib_samples=4, calib_len=32, progress=False)
    for name, w in linears(lm.model).items():
        assert w.dtype == torch.bfloat16 and ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_calibration_batches(tiny_model_dir, calib_file, tmp_path):
    tok = fresh(tiny_model_dir).tokenizer
    ids = tok.encode(open(calib_file).read(), add_special_tokens=False)
    b = calibration_batches(tok, calib_file, 5, 40, seed=1)
    assert b.shape == (5, 40) and b.dtype == torch.int64
    assert torch.equal(b, calibration_batches(tok, calib_file, 5, 40, seed=1))
    assert not torch.equal(b, calibration_batches(tok, calib_file, 5, 40, seed=2))
    s = " ".join(map(str, ids))  # every window is a contiguous slice of the token stream
    assert all(" ".join(map(str, row.tolist())) in s for row in b)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("the fox")
    for path, msg in ((tmp_path / "nope.txt", "not found"), (tmp_path / "empty.txt", "empty"),
                      (tmp_path / "short.txt", "fewer than")):
        with pytest.raises(RarefyError, match=msg):
            calibration_batches(tok, str(path), 2, 40, seed=0)


@pytest.mark.parametrize("kw,msg", [
    (dict(sparsity=1.0), r"\[0, 1\)"),
    (dict(sparsity=-0.1), r"\[0, 1\)"),
    (dict(sparsity="mlp=0.5,foo=0.3"), "foo"),
    (dict(sparsity="mlp=0.5;attn=0.3"), "sparsity"),
    (dict(pattern=(5, 4)), "cannot exceed"),
    (dict(pattern="2:4", sparsity=0.5), "fixes the sparsity"),
    (dict(pattern="2:3"), "not a multiple of M=3"),
    (dict(block=(3, 3), sparsity=0.5), r"model\.layers\.0\.self_attn\.q_proj of shape 64x64"),
    (dict(block="4x4"), "give a sparsity"),
    (dict(method="wanda", sparsity=0.5, calib=None), "--calib"),
    (dict(method="sparsegpt", sparsity=0.5, calib="/nonexistent/calib.txt"), "not found"),
    (dict(method="obs", sparsity=0.5), "unknown pruning method"),
    (dict(sparsity=0.5, calib_len=10_000), "exceeds the model's context"),
    (dict(sparsity=0.5, dampening=-1.0), "dampening"),
    (dict(sparsity=0.5, calib_samples=0), "samples"),
])
def test_bad_input_leaves_model_untouched(kw, msg, tiny_model_dir, calib_file):
    lm = fresh(tiny_model_dir)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    kw = {"method": "sparsegpt", "calib": calib_file, **kw}
    with pytest.raises(RarefyError, match=msg):
        prune_model(lm.model, lm.tokenizer, calib_samples=kw.pop("calib_samples", 4),
                    calib_len=kw.pop("calib_len", 32), progress=False, **kw)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_skip_warns_when_matching_nothing(tiny_model_dir):
    lm = fresh(tiny_model_dir)
    rep = prune_model(lm.model, None, "magnitude", sparsity=0.5, skip=["lm_head", "*.q_proj"],
                      progress=False)
    assert len(rep.matrices) == 12 and rep.layer_errors is None
    assert any("lm_head" in w for w in rep.warnings)
    assert math.isclose(rep.by_component()["k_proj"], 0.5)


@pytest.mark.gpu
def test_cuda_matches_cpu_pattern(tiny_model_dir, calib_file):
    lm = load_model(tiny_model_dir, device="cuda", dtype="bf16")
    rep = prune_model(lm.model, lm.tokenizer, "sparsegpt", sparsity=0.5, calib=calib_file,
                      calib_samples=8, calib_len=64, progress=False)
    assert rep.device.startswith("cuda") and len(rep.matrices) == 14
    for name, w in linears(lm.model).items():
        assert w.is_cuda and (w == 0).sum().item() == round(0.5 * w.numel()), name


def test_nothing_to_prune_is_a_no_op(tiny_model_dir, calib_file):
    lm = fresh(tiny_model_dir)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rep = prune_model(lm.model, lm.tokenizer, "sparsegpt", sparsity=0.0, calib=calib_file,
                      calib_samples=2, calib_len=16, progress=False)
    assert rep.matrices == [] and any("nothing to prune" in w for w in rep.warnings)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
