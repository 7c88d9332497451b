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
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["inputs"] == 2 * 4 and (info["mode"], info["allocation"]) == ("threshold", "uniform")
    for s in ("0.2500", "0.5000"):  # true sparsity over all inputs, both ways of weighting
        assert abs(info["measured"][s]["weighted"] - float(s)) < 0.1
        assert abs(info["measured"][s]["entries"] - float(s)) < 0.1
    saved = json.loads((out / "activation_thresholds.json").read_text())
    assert saved["version"] == 3 and saved["measured"] == info["measured"]

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
    for args, msg in [
        (("--mode", "bogus"), "--mode must be one of threshold, topk, adaptive"),
        (("--sparsity", "0.2,x"), "--sparsity takes numbers"),
        (("--sparsity", "-0.1"), "[0, 1)"),
        (("--greedy", "--sparsity", "0.995"), "at most sparsity 0.99"),
        (("--greedy", "--greedy-step", "0"), "greedy step"),
    ]:
        r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, *args, "--out", tmp_path / "y")
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a file calibrated on another model: one clear message
    other = tmp_path / "other.json"
    data = json.loads((out / "activation_thresholds.json").read_text())
    data["model"]["hidden_size"] = 4096
    other.write_text(json.dumps(data))
    r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 1,
            "--activation-sparsity", other, "--activation-level", 0.25)
    assert r.exit_code != 0 and "calibrated on another model" in r.output


def test_topk_and_adaptive_greedy_apply(tiny_model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Sparse activations skip weight columns. The quick brown fox jumps over the lazy dog. " * 300)

    def ppl(*extra):
        r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 2, "--json", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout.strip().splitlines()[-1])["ppl"]

    dense = ppl()
    for mode in ("topk", "adaptive"):
        out = tmp_path / mode
        r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--sparsity", "0.4",
                "--mode", mode, "--greedy", "--greedy-step", 0.1, "--greedy-tokens", 32, "--samples", 2,
                "--seq-len", 32, "--out", out, "--json")
        assert r.exit_code == 0, r.output
        info = json.loads(r.stdout.strip().splitlines()[-1])
        assert (info["mode"], info["allocation"]) == (mode, "greedy")
        assert abs(info["measured"]["0.4000"]["weighted"] - 0.4) < 0.1
        saved = json.loads((out / "activation_thresholds.json").read_text())
        assert saved["mode"] == mode and "thresholds" not in saved
        assert ppl("--activation-sparsity", out) != dense  # one level: no --activation-level needed
    r = run("generate", "--model", tiny_model_dir, "--max-tokens", 3, "--activation-sparsity", tmp_path / "topk",
            "hello")
    assert r.exit_code == 0, r.output


def test_weighted_sequential_calibrate_and_apply(tiny_model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Sparse activations skip weight columns. The quick brown fox jumps over the lazy dog. " * 300)
    out = tmp_path / "weighted"
    r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--sparsity", "0.4",
            "--criterion", "weighted", "--sequential", "--global", "--global-refine", 1, "--samples", 4,
            "--seq-len", 32, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert (info["criterion"], info["sequential"], info["allocation"]) == ("weighted", True, "global")
    assert abs(info["measured"]["0.4000"]["weighted"] - 0.4) < 0.1
    saved = json.loads((out / "activation_thresholds.json").read_text())
    assert saved["version"] == 3 and saved["criterion"] == "weighted"

    def ppl(*extra):
        r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 2, "--json", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout.strip().splitlines()[-1])["ppl"]

    assert ppl("--activation-sparsity", out) != ppl()
    r = run("generate", "--model", tiny_model_dir, "--max-tokens", 3, "--activation-sparsity", out, "hello")
    assert r.exit_code == 0, r.output
    r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--criterion", "norm",
            "--out", tmp_path / "z")
    assert r.exit_code != 0 and "--criterion must be one of magnitude, weighted" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "z").exists()
    r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--greedy", "--global",
            "--out", tmp_path / "z")
    assert r.exit_code != 0 and "choose one of --greedy and --global" in r.output


def test_global_match_option(tiny_model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Sparse activations skip weight columns. The quick brown fox jumps over the lazy dog. " * 300)
    out = tmp_path / "matched"
    r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--sparsity", "0.5", "--global",
            "--global-match", 2, "--samples", 4, "--seq-len", 32, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "activation_thresholds.json").read_text())
    assert len(saved["calibration"]["global"]["match"]["0.5000"]) == 2
    r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--global", "--global-match", -1,
            "--out", tmp_path / "z")
    assert r.exit_code != 0 and "--global-match takes N >= 0" in r.output and not (tmp_path / "z").exists()
