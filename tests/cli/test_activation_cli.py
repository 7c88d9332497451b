"""`rarefy calibrate-activations` and --activation-sparsity on generate / eval ppl."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rarefy.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_calibrate_then_apply(tiny_model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Sparse activations skip weight columns. The quick brown fox jumps over the lazy dog. " * 300)
    out = tmp_path / "act"
    r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--sparsity", "0.25,0.5",
            "--samples", 4, "--seq-len", 32, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["inputs"] == 2 * 4
    assert (out / "activation_thresholds.json").is_file()

    def ppl(*extra):
        r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 4, "--json", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout.strip().splitlines()[-1])["ppl"]

    dense, sparse = ppl(), ppl("--activation-sparsity", out, "--activation-level", 0.5)
    assert sparse != dense
    r = run("generate", "--model", tiny_model_dir, "--max-tokens", 3, "--activation-sparsity", out,
            "--activation-level", 0.25, "hello")
    assert r.exit_code == 0, r.output

    # bad input: one clear message, non-zero exit
    for args, msg in [
        (("--activation-sparsity", out), "--activation-level"),  # two levels calibrated
        (("--activation-sparsity", out, "--activation-level", 0.4), "no thresholds for sparsity"),
        (("--activation-level", 0.4), "needs --activation-sparsity"),
        (("--activation-sparsity", tmp_path / "missing"), "not found"),
    ]:
        r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 1, *args)
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
    r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--sparsity", "1.0",
            "--out", tmp_path / "x")
    assert r.exit_code != 0 and "[0, 1)" in r.output
    r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--mode", "topk",
            "--out", tmp_path / "y")
    assert r.exit_code != 0 and "--mode" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
