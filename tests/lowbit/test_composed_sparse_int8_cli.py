"""Sparse + int8 end to end on the tiny checkpoint: `rarefy prune` -> `rarefy quantize --to int8`
(kept sparse) -> safetensors + metadata -> loaded back as SparseLinear(Int8TiledBitmap) ->
`rarefy generate` / `rarefy eval ppl`.

Loaded through rarefy.models.loader.load_model's sparse int8 hook.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rarefy.cli import app
from rarefy.formats.sparse_weight import Int8TiledBitmap
from rarefy.layers.sparse_linear import SparseLinear
from rarefy.lowbit.composed import load_sparse_int8
from rarefy.models import loader


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "pruned"
    r = run("prune", "--model", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def quantized(pruned, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "sparse_int8"
    r = run("quantize", "--model", pruned, "--to", "int8", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout.strip().splitlines()[-1])


def test_quantize_writes_sparse_int8(quantized):
    out, d = quantized
    assert d["format"] == "sparse-int8" and d["quantized"] == 2 * 7
    assert d["mean_density"] == pytest.approx(0.5, abs=0.01)
    # 0.5 B of int8 values + 1/8 B of bitmask per weight vs 2 B of bf16, plus 12 B per row of
    # row offset and scale (a lot at the tiny model's K = 64..128)
    assert d["sparse_int8_bytes"] < 0.45 * d["lowbit_bf16_bytes"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rarefy"]["weights_format"] == "sparse-int8"
    assert len(cfg["rarefy"]["sparse_int8"]["modules"]) == 14
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.compressed").dtype == torch.int8
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.float32
    assert "model.layers.0.mlp.up_proj.weight" not in keys


def test_loaded_matches_pruned_model(pruned, quantized):
    """Every projection is SparseLinear(Int8TiledBitmap) whose weight is the per-row int8
    quantization of the pruned weight, and the logits match the model with those
    weights dequantized (fp32)."""
    out, _ = quantized
    ref = loader.load_model(pruned, dtype="fp32", sparse="off").model
    got = load_sparse_int8(out, dtype="fp32").model
    n = 0
    for name, m in got.named_modules():
        if isinstance(m, SparseLinear):
            n += 1
            w = m.compiled.weight
            assert isinstance(w, Int8TiledBitmap)
            dense = ref.get_submodule(name).weight.detach()
            expect = Int8TiledBitmap.from_dense(dense)
            assert torch.equal(w.quantized(), expect.quantized()) and torch.equal(w.scale, expect.scale)
            assert not bool(((dense == 0) & (w.quantized() != 0)).any())
            ref.get_submodule(name).weight.data.copy_(w.to_dense())
    assert n == 14
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(got(ids), ref(ids), rtol=1e-4, atol=1e-4)


def test_generate_and_eval_ppl(quantized, pruned, tmp_path):
    out, _ = quantized
    gen = run("generate", "--model", out, "-n", 4, "--ignore-eos", "--json", "The quick")
    assert gen.exit_code == 0, gen.output
    assert len(json.loads(gen.stdout.strip().splitlines()[-1])["token_ids"]) == 4
    text = tmp_path / "t.txt"
    text.write_text("Sparse models run fast. The quick brown fox jumps over the lazy dog. " * 40)
    ppl = {}
    for name, model in (("q", out), ("p", pruned)):
        r = run("eval", "ppl", "--model", model, "--text", text, "--ctx", 32, "--chunks", 3, "--dtype", "fp32", "--json")
        assert r.exit_code == 0, r.output
        ppl[name] = json.loads(r.stdout.strip().splitlines()[-1])["ppl"]
    assert ppl["q"] == pytest.approx(ppl["p"], rel=0.05)


def test_bad_options(pruned, tiny_model_dir, tmp_path):
    r = run("quantize", "--model", pruned, "--to", "int8", "--group-size", 16, "--out", tmp_path / "a")
    assert r.exit_code != 0 and "--group-size is not supported" in r.output
    r = run("quantize", "--model", pruned, "--to", "ternary", "--sparse", "on", "--out", tmp_path / "b")
    assert r.exit_code != 0 and "int8 only" in r.output
    r = run("quantize", "--model", pruned, "--to", "int8", "--sparse", "maybe", "--out", tmp_path / "c")
    assert r.exit_code != 0 and "--sparse must be" in r.output
    # --sparse off: the dense int8 path as before
    r = run("quantize", "--model", pruned, "--to", "int8", "--sparse", "off", "--out", tmp_path / "d", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "d" / "config.json").read_text())["rarefy"]["weights_format"] == "lowbit"
    # an unpruned model with --sparse on: converted, with a warning per dense matrix
    r = run("quantize", "--model", tiny_model_dir, "--to", "int8", "--sparse", "on", "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output


def test_real_loader_hook(quantized):
    out, _ = quantized
    m = loader.load_model(out, dtype="fp32").model
    assert any(isinstance(x, SparseLinear) for x in m.modules())
