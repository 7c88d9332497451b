"""`rarefy calibrate-activations --rotate vo` (file format 4) and applying it with
--activation-sparsity on eval ppl / generate, on the tiny checkpoint and on the embedded GGUF
model (which must load dense for activation sparsity)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rarefy.cli import app

TEXT = "Sparse activations skip weight columns. The quick brown fox jumps over the lazy dog. " * 300


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def last_json(r):
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("rot") / "calib.txt"
    p.write_text(TEXT)
    return p


def test_rotated_calibration_round_trip(tiny_model_dir, text, tmp_path):
    out = tmp_path / "act"
    info = last_json(run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, "--sparsity", "0,0.5",
                         "--rotate", "vo", "--rotate-windows", 2, "--samples", 2, "--seq-len", 32, "--out", out,
                         "--json"))
    assert info["rotation"] == "vo" and abs(info["measured"]["0.5000"]["weighted"] - 0.5) < 0.1
    saved = json.loads((out / "activation_thresholds.json").read_text())
    assert saved["version"] == 4 and saved["rotation"]["kind"] == "vo" and saved["rotation"]["windows"] == 2
    assert (out / saved["rotation"]["file"]).is_file()

    def ppl(*extra):
        return last_json(run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 2,
                             "--dtype", "fp32", "--json", *extra))

    dense = ppl()
    assert "activation_sparsity" not in dense
    # level 0 zeroes nothing: the rotated model alone, which is the dense model
    zero = ppl("--activation-sparsity", out, "--activation-level", 0)
    assert zero["ppl"] == pytest.approx(dense["ppl"], rel=1e-5) and zero["activation_sparsity"]["weighted"] == 0
    half = ppl("--activation-sparsity", out, "--activation-level", 0.5)
    assert half["ppl"] != pytest.approx(dense["ppl"], rel=1e-3)
    assert abs(half["activation_sparsity"]["weighted"] - 0.5) < 0.15  # measured on the scored text
    r = run("generate", "--model", tiny_model_dir, "-n", 3, "--ignore-eos", "--json", "--activation-sparsity", out,
            "--activation-level", 0.5, "hello")
    assert len(last_json(r)["token_ids"]) == 3

    # a missing or foreign sidecar: one clear message, non-zero exit, no traceback
    side = out / saved["rotation"]["file"]
    good = side.read_bytes()
    side.unlink()
    for cmd in (("eval", "ppl", "--text", text, "--ctx", 32, "--chunks", 1), ("generate", "-n", 1, "hi")):
        r = run(*cmd, "--model", tiny_model_dir, "--activation-sparsity", out, "--activation-level", 0.5)
        assert r.exit_code != 0 and "rotation sidecar" in r.output and "is missing" in r.output, r.output
        assert "Traceback" not in r.output
    side.write_bytes(good[:-8] + b"\0" * 8)
    r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 1,
            "--activation-sparsity", out, "--activation-level", 0.5)
    assert r.exit_code != 0 and "does not match its calibration file" in r.output


def test_rotate_option_errors(tiny_model_dir, text, tmp_path):
    for args, msg in [(("--rotate", "residual"), "--rotate takes vo"),
                      (("--rotate", "vo", "--rotate-basis", "qr"), "--rotate-basis must be pca or svd"),
                      (("--rotate", "vo", "--rotate-windows", 0), "--rotate-windows must be >= 1")]:
        r = run("calibrate-activations", "--model", tiny_model_dir, "--calib", text, *args, "--out", tmp_path / "z")
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output and not (tmp_path / "z").exists()


@pytest.mark.slow
def test_embedded_gguf_rotated(tmp_path):
    """The embedded GGUF loads as GGUF blocks by default; calibration, rotation and the
    input-sparse decode layers need dense weights, so these commands load it dense."""
    text = tmp_path / "calib.txt"
    text.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 20)
    out = tmp_path / "act"
    info = last_json(run("calibrate-activations", "--calib", text, "--sparsity", "0.4", "--rotate", "vo",
                         "--rotate-windows", 1, "--samples", 1, "--seq-len", 16, "--out", out, "--json"))
    assert info["rotation"] == "vo" and info["inputs"] == 120
    r = run("generate", "-n", 2, "--ignore-eos", "--json", "--activation-sparsity", out, "The capital of France")
    assert len(last_json(r)["token_ids"]) == 2
