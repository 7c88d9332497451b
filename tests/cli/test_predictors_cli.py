"""`rarefy train-predictors` and --predictors on eval ppl, on the tiny checkpoint."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rarefy.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _train(model_dir, tmp_path, samples: int):
    """(calibration text, predictors at 50%, the command's result) on the tiny checkpoint."""
    text = tmp_path / "calib.txt"
    text.write_text("Sparse activations skip weight columns. The quick brown fox jumps over the lazy dog. " * 300)
    out = tmp_path / "pred"
    r = run("train-predictors", "--model", model_dir, "--calib", text, "--sparsity", 0.5,
            "--samples", samples, "--seq-len", 32, "--out", out)
    assert r.exit_code == 0, r.output
    return text, out, r


def test_train_then_eval(tiny_model_dir, tmp_path):
    text, out, r = _train(tiny_model_dir, tmp_path, 8)
    assert "layer   1  recall" in r.output and "mean" in r.output and "precision" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["predictors.json", "predictors.safetensors"]
    meta = json.loads((out / "predictors.json").read_text())
    assert meta["rank"] == 8 and meta["sparsity"] == 0.5 and not meta["ahead"] and meta["mode"] == "threshold"
    assert meta["kind"] == "swiglu" and meta["version"] == 2 and meta["training"]["epochs"] == 0
    assert len(meta["recall"]) == 2
    assert "swiglu predictors" in r.output and "of the MLP's weights" in r.output

    out2 = tmp_path / "pred_ahead"
    r = run("train-predictors", "--model", tiny_model_dir, "--calib", text, "--sparsity", 0.25, "--rank", 16,
            "--ahead", "--mode", "topk", "--samples", 8, "--seq-len", 32, "--epochs", 1, "--kind", "linear",
            "--out", out2, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert (d["rank"], d["ahead"], d["mode"], d["keep"], d["layers"]) == (16, True, "topk", 72, 2)
    assert d["kind"] == "linear" and d["epochs"] == 1
    assert d["held_out_tokens"] == 32 and 0 < d["mean_recall"] <= 1

    def ppl(*extra):
        r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 4, "--json", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout.strip().splitlines()[-1])

    dense, masked = ppl(), ppl("--predictors", out)
    assert "mlp_neuron_sparsity" not in dense
    assert masked["mlp_neuron_sparsity"] == 0.5 and masked["ppl"] != dense["ppl"]
    r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 2, "--predictors", out2)
    assert r.exit_code == 0 and "MLP neuron sparsity 0.250" in r.output, r.output

    # swiglu with BCE fine-tuning, one layer ahead
    out3 = tmp_path / "pred_ft"
    r = run("train-predictors", "--model", tiny_model_dir, "--calib", text, "--sparsity", 0.5, "--kind", "swiglu",
            "--epochs", 2, "--ahead", "--samples", 8, "--seq-len", 32, "--out", out3, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["kind"] == "swiglu" and d["epochs"] == 2 and d["ahead"] and 0 < d["cost_vs_mlp"] < 1
    assert ppl("--predictors", out3)["mlp_neuron_sparsity"] == 0.5


def test_bad_input(tiny_model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    base = ("train-predictors", "--model", tiny_model_dir, "--calib", text, "--samples", 4, "--seq-len", 32,
            "--epochs", 1)
    for extra, msg in [
        (("--sparsity", 1.0), "[0, 1)"),
        (("--sparsity", -0.2), "[0, 1)"),
        (("--rank", 0), "--rank"),
        (("--rank", 65), "hidden size 64"),
        (("--mode", "bogus"), "--mode"),
        (("--kind", "relu"), "--kind"),
        (("--kind", "linear", "--epochs", 0), "--epochs"),
        (("--epochs", -1), "--epochs"),
    ]:
        dest = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        r = run(*base, "--out", dest, *extra)
        assert r.exit_code != 0 and msg in r.output, (extra, r.output)
        assert r.output.count("error:") == 1 and "Traceback" not in r.output
        assert not dest.exists()
    r = run("train-predictors", "--model", tiny_model_dir, "--calib", tmp_path / "missing.txt", "--out", tmp_path / "m")
    assert r.exit_code != 0 and "not found" in r.output and not (tmp_path / "m").exists()
    # leftover temporary directories: none
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # predictors of another model are refused on eval
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictors.json").write_text(json.dumps({
        "format": "rarefy-neuron-predictors", "version": 1, "rank": 8, "sparsity": 0.5, "ahead": False,
        "mode": "threshold", "model": {"num_layers": 30, "hidden_size": 576, "intermediate_size": 1536}}))
    (other / "predictors.safetensors").write_bytes(b"")
    r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 1,
            "--predictors", other)
    assert r.exit_code != 0 and "another model" in r.output, r.output
    r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 1,
            "--predictors", tmp_path / "nope")
    assert r.exit_code != 0 and "not found" in r.output, r.output
    # a non-empty --out is refused without --overwrite
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    r = run(*base, "--out", busy)
    assert r.exit_code != 0 and "not empty" in r.output and (busy / "keep.txt").exists()


def test_cli_activation_sparsity_takes_predictors(tiny_model_dir, tmp_path):
    """generate / eval ppl --activation-sparsity DIR with a predictor directory (PredictedMLP)."""
    text, pred, _ = _train(tiny_model_dir, tmp_path, 4)

    base = ("generate", "--model", tiny_model_dir, "--max-tokens", 6, "--ignore-eos", "--json")
    r = run(*base, "--activation-sparsity", pred, "The quick brown")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 6
    assert 0.3 < out["mlp_neuron_sparsity"] <= 0.5  # decode tokens at 0.5; a short prompt is masked too

    # eval ppl: --activation-sparsity PREDICTORS is --predictors
    ppl = ("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 2, "--json")
    a = json.loads(run(*ppl, "--activation-sparsity", pred).stdout.strip().splitlines()[-1])
    b = json.loads(run(*ppl, "--predictors", pred).stdout.strip().splitlines()[-1])
    assert a["ppl"] == b["ppl"] and a["mlp_neuron_sparsity"] == 0.5

    for args, msg in [
        ((*base, "--activation-sparsity", pred, "--activation-level", 0.5, "hi"), "--activation-level"),
        ((*base, "--activation-sparsity", pred, "--cpu-compile", "hi"), "--cpu-compile"),
        ((*ppl, "--activation-sparsity", pred, "--predictors", pred), "once"),
        ((*ppl, "--activation-sparsity", pred, "--activation-level", 0.5), "--activation-level"),
    ]:
        r = run(*args)
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output
