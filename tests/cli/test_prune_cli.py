"""`rarefy prune` end to end on the tiny checkpoint, and its bad-input cases."""

import json

import pytest
import torch
from typer.testing import CliRunner

from rarefy.cli import app
from rarefy.models.loader import load_model


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("Sparse models run fast. The quick brown fox jumps over the lazy dog. " * 200)
    return p


@pytest.mark.parametrize("method,args", [
    ("magnitude", ["--sparsity", "0.5"]),
    ("wanda", ["--pattern", "2:4"]),
    ("sparsegpt", ["--sparsity", "mlp=0.6,attn=0.4"]),
])
def test_prune_and_reload(tiny_model_dir, calib, tmp_path, method, args):
    out = tmp_path / "pruned"
    r = run("prune", "--model", tiny_model_dir, "--method", method, *args, "--calib", calib,
            "--calib-samples", 4, "--calib-len", 32, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["matrices"] == 2 * 7
    m = load_model(out, dtype="fp32").model
    for name, p in m.named_parameters():
        if name.endswith("mlp.up_proj.weight"):
            zeros = (p == 0).float().mean().item()
            assert zeros == pytest.approx({"magnitude": 0.5, "wanda": 0.5, "sparsegpt": 0.6}[method], abs=1e-3)
        if name.endswith("self_attn.q_proj.weight") and method == "sparsegpt":
            assert (p == 0).float().mean().item() == pytest.approx(0.4, abs=1e-3)
        if method == "wanda" and name.endswith("_proj.weight"):
            assert ((p != 0).view(p.shape[0], -1, 4).sum(-1) <= 2).all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rarefy"]["method"] == method
    gen = run("generate", "--model", out, "-n", 4, "--ignore-eos", "--json", "The quick")
    assert gen.exit_code == 0, gen.output


@pytest.mark.parametrize("args,fragment", [
    (["--method", "magnitude", "--sparsity", "1.0"], "sparsity"),
    (["--method", "magnitude", "--sparsity", "-0.1"], "sparsity"),
    (["--method", "magnitude", "--pattern", "5:4"], "N"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib", "/nonexistent.txt"], "not found"),
    (["--method", "magnitude", "--block", "7x7", "--sparsity", "0.5"], "divide"),
    (["--method", "lottery", "--sparsity", "0.5"], "method"),
])
def test_bad_input_writes_nothing(tiny_model_dir, tmp_path, args, fragment):
    out = tmp_path / "never"
    r = run("prune", "--model", tiny_model_dir, *args, "--out", out)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert fragment in r.output, r.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp directory left either


def test_out_equal_to_input_is_refused(tiny_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    r = run("prune", "--model", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
            "--out", tiny_model_dir, "--overwrite")
    assert r.exit_code == 1 and "input" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before
    assert torch.isfinite(load_model(tiny_model_dir, dtype="fp32").model(torch.tensor([[1, 2]]))).all()


def test_generate_runs_pruned_checkpoint_sparse(tiny_model_dir, tmp_path, monkeypatch):
    """A `rarefy prune` checkpoint loads through SparseLinear in the CLI (autotuned; here the
    timing is replaced so every matrix goes sparse), and `rarefy compile` reports on it."""
    import rarefy.sparse_compiler.compile as comp
    from rarefy.cli_common import load_for_cli
    from rarefy.layers.sparse_linear import SparseLinear

    monkeypatch.setenv("RAREFY_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(comp, "time_us", lambda fns, dev, reps=20: 5.0 if "dense_matmul" in fns[0].__code__.co_names
                        else 1.0)
    out = tmp_path / "pruned"
    assert run("prune", "--model", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
               "--out", out).exit_code == 0
    loaded = load_for_cli(str(out), "cpu", "fp32")
    assert sum(isinstance(m, SparseLinear) for m in loaded.model.modules()) == 2 * 7
    dense = load_model(out, dtype="fp32").model
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids), dense(ids), atol=1e-4, rtol=1e-4)
    r = run("generate", "--model", out, "--max-tokens", 4, "hello")
    assert r.exit_code == 0, r.output
    for mode in ("force", "off"):
        assert run("generate", "--model", out, "--max-tokens", 2, "--sparse", mode, "hi").exit_code == 0
    r = run("generate", "--model", out, "--sparse", "bogus", "hi")
    assert r.exit_code != 0 and "--sparse" in r.output
    rep = tmp_path / "report"
    r = run("compile", "--model", out, "--out", rep, "--batches", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["sparse_layers"] == 14
    assert "format" in (rep / "report.md").read_text()
    assert run("compile", "--model", out, "--out", rep).exit_code != 0  # not empty: refused
