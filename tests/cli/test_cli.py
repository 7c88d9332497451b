"""The CLI end to end on a tiny random checkpoint, and every bad-input case."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from rarefy.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_user_error(result, fragment):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert fragment in result.output, result.output


def test_generate_json(tiny_model_dir):
    r = run("generate", "--model", tiny_model_dir, "--max-tokens", 8, "--ignore-eos", "--json",
            "The quick brown fox")
    assert r.exit_code == 0, r.output
    out = last_json(r)
    assert len(out["token_ids"]) == 8 and out["prompt_tokens"] > 1
    assert out["decode_tok_s"] > 0 and out["ttft_s"] > 0 and isinstance(out["text"], str)


def test_generate_cpu_compile_same_tokens(tiny_model_dir):
    """--cpu-compile runs the decode step through torch.compile: the same greedy tokens."""
    args = ["generate", "--model", tiny_model_dir, "-n", 8, "--ignore-eos", "--json", "The quick brown fox"]
    eager, compiled = run(*args), run(*args, "--cpu-compile")
    assert compiled.exit_code == 0, compiled.output
    assert last_json(compiled)["token_ids"] == last_json(eager)["token_ids"]


def test_generate_several_prompts_and_sampling(tiny_model_dir):
    args = ["generate", "--model", tiny_model_dir, "-n", 6, "--ignore-eos", "--json",
            "--temperature", 0.8, "--top-k", 20, "--top-p", 0.9, "--seed", 7, "Sparse", "The lazy dog"]
    a, b = run(*args), run(*args)
    assert a.exit_code == 0, a.output
    ja, jb = last_json(a), last_json(b)
    assert len(ja["token_ids"]) == 2 and all(len(t) == 6 for t in ja["token_ids"])
    assert ja["token_ids"] == jb["token_ids"]  # same seed, same tokens


def test_generate_streams_text(tiny_model_dir):
    r = run("generate", "--model", tiny_model_dir, "-n", 5, "--ignore-eos", "--chat", "hello")
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.output


def test_info(tiny_model_dir):
    r = run("info", "--model", tiny_model_dir, "--json")
    assert r.exit_code == 0, r.output
    d = last_json(r)
    assert d["architecture"] == "llama" and d["params"] > 0
    assert set(d["components"]) >= {"embedding", "attention", "mlp", "lm_head", "norms"}
    assert d["components"]["mlp"]["params"] == 2 * 3 * 64 * 96


def test_eval_ppl(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 3, "--json")
    assert r.exit_code == 0, r.output
    d = last_json(r)
    assert d["chunks"] == 3 and d["tokens"] == 3 * 31 and d["ppl"] > 1 and d["stderr"] > 0
    r2 = run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 32, "--chunks", 3,
             "--score-second-half", "--json")
    assert last_json(r2)["tokens"] == 3 * 16


@pytest.mark.parametrize("args,fragment", [
    (["generate", "--model", "/nonexistent/model", "hi"], "model not found"),
    (["generate", "--device", "cuda", "hi"], "CUDA"),
    (["generate", "--dtype", "fp12", "hi"], "unsupported dtype"),
    (["generate", "--top-p", "0", "hi"], "--top-p"),
    (["eval", "ppl", "--text", "/nonexistent.txt"], "not found"),
])
def test_bad_options(args, fragment):
    assert_user_error(run(*args), fragment)


def test_empty_prompt(tiny_model_dir):
    assert_user_error(run("generate", "--model", tiny_model_dir, "   "), "empty prompt")


def test_context_too_long(tiny_model_dir, tmp_path):
    assert_user_error(run("generate", "--model", tiny_model_dir, "-n", 1000, "hi"), "context")
    text = tmp_path / "t.txt"
    text.write_text("word " * 2000)
    assert_user_error(run("eval", "ppl", "--model", tiny_model_dir, "--text", text, "--ctx", 4096),
                      "context")


def test_corrupt_files(tiny_model_dir, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00\x01not a model" * 100)
    assert_user_error(run("info", "--model", junk), "neither")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run("generate", "--model", broken, "hi"), "safetensors")
    (broken / "config.json").write_text("{not json")
    assert_user_error(run("info", "--model", broken), "config.json")


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run("generate", "--model", other, "hi"), "unsupported architecture")


def test_missing_tensor(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    other = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, other)
    sd = load_file(other / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, other / "model.safetensors")
    assert_user_error(run("generate", "--model", other, "hi"), "lacks")


def test_chat_loop(tiny_model_dir):
    from rarefy.engine.chat import run_chat
    from rarefy.layers.sampler import SamplingParams
    from rarefy.models.loader import load_model
    lm = load_model(tiny_model_dir)
    said = iter(["hello there", "", "/reset", "again", "/exit", "never read"])
    out = []
    run_chat(lm, SamplingParams(max_tokens=5, ignore_eos=True), system="be brief",
             read=lambda prompt: next(said), write=out.append)
    text = "".join(out)
    assert text.count("tok/s]") == 2  # two answered turns; blank line and /reset answer nothing
    assert next(said) == "never read"  # /exit stopped the loop


def test_chat_ends_on_eof(tiny_model_dir):
    from rarefy.engine.chat import run_chat
    from rarefy.layers.sampler import SamplingParams
    from rarefy.models.loader import load_model

    def eof(prompt):
        raise EOFError
    run_chat(load_model(tiny_model_dir), SamplingParams(max_tokens=3), read=eof, write=lambda s: None)
