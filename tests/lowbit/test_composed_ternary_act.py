"""Ternary + activation sparsity in a model: TernaryInputSparseLinear and
use_ternary_activation_sparsity on the tiny checkpoint quantized to ternary, against the same
model with the inputs masked by hooks (rarefy.sparsity.activation.sparsify_activations); and
`rarefy generate --activation-sparsity DIR` on it: through a patched-in hook
(test_generate_with_activation_sparsity, written before the hook existed) and through
rarefy.commands.calibrate_activations.activation_for_decode's own ternary path
(test_real_cli_hook).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from typer.testing import CliRunner

import rarefy.cli
from rarefy.cli import app
from rarefy.errors import RarefyError
from rarefy.layers.lowbit_linear import TernaryLinear
from rarefy.layers.ternary_activation_sparse import (TernaryInputSparseLinear, has_ternary_projections,
                                                     use_ternary_activation_sparsity)
from rarefy.models.loader import load_model
from rarefy.sparsity.activation import LevelRule, sparsify_activations


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "calib.txt"
    p.write_text("Sparse activations skip weight columns. The quick brown fox jumps over the lazy dog. " * 300)
    return p


@pytest.fixture(scope="module")
def ternary_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tern") / "ternary"
    r = run("quantize", "--model", tiny_model_dir, "--to", "ternary", "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def act_dir(ternary_dir, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("act") / "act"
    r = run("calibrate-activations", "--model", ternary_dir, "--calib", text, "--sparsity", "0.4",
            "--samples", 4, "--seq-len", 32, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    return out


def _thresholds(model, t):
    n = len(model.model.layers)
    return {f"{i}.{k}": t for i in range(n) for k in ("attn_in", "o_in", "mlp_in", "down_in")}


@pytest.mark.parametrize("t", [0.0, 0.05, 1e9])
def test_decode_matches_masked_reference(ternary_dir, t):
    ref = load_model(ternary_dir, dtype="fp32").model
    got = load_model(ternary_dir, dtype="fp32").model
    assert has_ternary_projections(got)
    th = _thresholds(got, t)
    assert use_ternary_activation_sparsity(got, th) == len(got.model.layers) * 7
    assert not any(isinstance(m, TernaryLinear) and not isinstance(p, TernaryInputSparseLinear)
                   for p in got.modules() for m in p.children())
    ids = torch.tensor([[5, 17]])
    with torch.no_grad():
        for pos in range(2):  # one token per call: the kernel path
            y = got(ids[:, pos:pos + 1], positions=torch.tensor([[pos]]))
            with sparsify_activations(ref, LevelRule("threshold", th)):
                r = ref(ids[:, pos:pos + 1], positions=torch.tensor([[pos]]))
            torch.testing.assert_close(y, r, rtol=2e-3, atol=2e-3)
        # a prompt (more than 16 rows) runs the wrapped TernaryLinear, dense
        long = torch.randint(0, 200, (1, 20))
        torch.testing.assert_close(got(long), ref(long), rtol=1e-5, atol=1e-5)


def test_refusals(tiny_model_dir, ternary_dir, tmp_path):
    dense = load_model(tiny_model_dir, dtype="fp32").model
    with pytest.raises(RarefyError, match="not ternary"):
        use_ternary_activation_sparsity(dense, _thresholds(dense, 0.1))
    m = load_model(ternary_dir, dtype="fp32").model
    with pytest.raises(RarefyError, match="lack input"):
        use_ternary_activation_sparsity(m, {"0.attn_in": 0.1})
    with pytest.raises(RarefyError, match="weighted criterion"):
        use_ternary_activation_sparsity(m, LevelRule("threshold", _thresholds(m, 0.1), "weighted"))
    assert not any(isinstance(x, TernaryInputSparseLinear) for x in m.modules())  # nothing changed
    out = tmp_path / "g"
    r = run("quantize", "--model", tiny_model_dir, "--to", "ternary", "--group-size", 16, "--out", out)
    assert r.exit_code == 0, r.output
    g = load_model(out, dtype="fp32").model
    with pytest.raises(RarefyError, match="per-group"):
        use_ternary_activation_sparsity(g, _thresholds(g, 0.1))


@pytest.fixture
def hooked(monkeypatch):
    orig = rarefy.cli.activation_for_decode

    def activation_for_decode(model, directory, level):
        if directory is not None and has_ternary_projections(model):
            from rarefy.commands.calibrate_activations import load_activation_level
            th, level = load_activation_level(model, directory, level)
            use_ternary_activation_sparsity(model, th.rule(level))
            return contextlib.nullcontext()
        return orig(model, directory, level)

    monkeypatch.setattr(rarefy.cli, "activation_for_decode", activation_for_decode)


def test_generate_with_activation_sparsity(ternary_dir, act_dir, text, hooked):
    r = run("generate", "--model", ternary_dir, "-n", 4, "--ignore-eos", "--json", "--activation-sparsity", act_dir,
            "The quick")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) == 4
    # eval ppl applies the thresholds through hooks (the quality reference) and works as before
    r = run("eval", "ppl", "--model", ternary_dir, "--text", text, "--ctx", 32, "--chunks", 2, "--json",
            "--activation-sparsity", act_dir)
    assert r.exit_code == 0, r.output


def test_real_cli_hook(ternary_dir, act_dir, monkeypatch):
    """activation_for_decode itself takes the ternary path (no patch)."""
    import rarefy.layers.ternary_activation_sparse as tas
    swapped = []
    real = tas.use_ternary_activation_sparsity
    monkeypatch.setattr(tas, "use_ternary_activation_sparsity", lambda *a, **k: swapped.append(real(*a, **k)))
    r = run("generate", "--model", ternary_dir, "-n", 2, "--ignore-eos", "--json", "--activation-sparsity", act_dir,
            "Hi")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) == 2 and swapped and swapped[0] > 0
