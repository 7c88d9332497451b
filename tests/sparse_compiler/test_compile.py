"""The sparse compiler: pattern analysis, plan cache (hit / miss / cross-process hash), the
per-layer dense fallback, SparseLinear in a model, and `rarefy compile`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rarefy.layers.sparse_linear import SparseLinear, use_sparse_weights
from rarefy.sparse_compiler import analyze_pattern, compile_matrix, pattern_hash
from rarefy.sparsity.masks import nm_mask


def _weight(n=96, k=160, sparsity=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w


def test_analyze_pattern():
    w = _weight()
    w[5] = 0
    s = analyze_pattern(w)
    assert s.density == int((w != 0).sum()) / w.numel()
    assert s.empty_rows == 1 and s.row_nnz_min == 0
    assert s.nm == []
    w24 = torch.randn(8, 64)
    w24 = w24 * nm_mask(w24.abs(), 2, 4)
    assert analyze_pattern(w24).nm == [(2, 4), (4, 8)]
    dense_blocks = torch.zeros(64, 64)
    dense_blocks[:16, :16] = 1
    assert analyze_pattern(dense_blocks).block_fill[16] == pytest.approx(1 / 16)


def test_pattern_hash_stable_across_processes():
    w = _weight(seed=3)
    code = ("import torch; from rarefy.sparse_compiler import pattern_hash; g=torch.Generator().manual_seed(3);"
            "w=torch.randn(96,160,generator=g); w[torch.rand(96,160,generator=g)<0.5]=0; print(pattern_hash(w))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == pattern_hash(w)
    # values do not matter, positions do
    assert pattern_hash(w * 2) == pattern_hash(w)


def test_cache_hit_and_miss(tmp_path):
    w = _weight(seed=5).half()
    first = compile_matrix(w, (1,), cache_dir=tmp_path)
    assert not first.cache_hit and first.report["measured_us"]["1"] > 0
    again = compile_matrix(w.clone(), (1,), cache_dir=tmp_path)
    assert again.cache_hit and again.plan.format == first.plan.format
    changed = w.clone()
    i = int((changed[0] != 0).nonzero()[0])
    changed[0, i] = 0  # one weight pruned: a different pattern
    assert not compile_matrix(changed, (1,), cache_dir=tmp_path).cache_hit
    other_batches = compile_matrix(w, (1, 4), cache_dir=tmp_path)
    assert not other_batches.cache_hit
    (entry,) = [p for p in tmp_path.iterdir() if json.loads(p.read_text())["configs"].keys() == {"1"}][:1]
    entry.write_text("{not json")  # a damaged entry is searched again, not fatal
    assert compile_matrix(w, (1,), cache_dir=tmp_path).plan is not None


def test_compiled_matrix_matches_reference(tmp_path):
    for w in (_weight(seed=1), torch.randn(64, 96) * nm_mask(torch.randn(64, 96).abs(), 2, 4)):
        cm = compile_matrix(w, (1, 3), cache_dir=tmp_path, autotune=False)
        assert cm.plan.format in ("bitmap", "nm")  # fewest bytes without timing
        x, b = torch.randn(3, w.shape[1]), torch.randn(w.shape[0])
        ref = x.double() @ w.double().T + b.double()
        assert torch.allclose(cm(x, b).double(), ref, rtol=1e-5, atol=1e-5)


def test_dense_fallback_when_sparse_is_slower(tmp_path, monkeypatch):
    """Where the measured sparse kernel loses, the plan stays dense and the layer is not swapped."""
    import rarefy.sparse_compiler.compile as comp
    real = comp.time_us
    monkeypatch.setattr(comp, "time_us", lambda fns, dev, reps=20: 1.0 if "dense_matmul" in fns[0].__code__.co_names
                        else 5.0)
    cm = compile_matrix(_weight(seed=9), (1,), cache_dir=tmp_path)
    assert cm.plan.format == "dense"
    monkeypatch.setattr(comp, "time_us", real)


def test_sparse_linear_greedy_tokens_match_dense(tmp_path):
    """Greedy generation through SparseLinear = with the dense reconstruction (fp32, CPU)."""
    from rarefy.config import ModelConfig
    from rarefy.engine.generate import Generator
    from rarefy.layers.sampler import SamplingParams
    from rarefy.models.llama import DecoderLM
    from rarefy.sparsity.prune import prune_model

    cfg = ModelConfig(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.rotary.build(torch.device("cpu"))
    model.eval()
    prune_model(model, None, "magnitude", sparsity=0.5, progress=False)
    sparse = DecoderLM(cfg)
    sparse.load_state_dict(model.state_dict())
    sparse.rotary.build(torch.device("cpu"))
    sparse.eval()
    reports = use_sparse_weights(sparse, autotune=False, cache_dir=tmp_path)
    assert len(reports) == 2 * 7
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 14
    prompt = [[5, 17, 42, 7]]
    params = SamplingParams(max_tokens=24)
    a, _ = Generator(model, None).generate(prompt, params)
    b, _ = Generator(sparse, None).generate(prompt, params)
    assert a[0].token_ids == b[0].token_ids


def test_compile_cli_bad_input(tmp_path):
    from typer.testing import CliRunner
    from rarefy.cli import app
    r = CliRunner().invoke(app, ["compile", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "not found" in r.output
    r = CliRunner().invoke(app, ["compile", "--out", str(tmp_path / "o"), "--batches", "x"])
    assert r.exit_code != 0 and "--batches" in r.output
    assert not (tmp_path / "o").exists()
