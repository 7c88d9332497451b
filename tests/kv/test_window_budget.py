"""Per-layer window budgets: candidates, greedy allocation, config files, the CLI."""

from __future__ import annotations

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.kv.policies import PolicyConfig, Window, load_policy_config
from rarefy.kv.window_budget import (
    WindowErrors,
    _hull,
    allocate_windows,
    candidate_windows,
    check_budget,
    measure_window_errors,
    policy_config_text,
    window_for_blocks,
    write_policy_config,
)


def test_window_for_blocks_is_the_widest_that_fits():
    w = window_for_blocks(32, 16, 2048, 16)
    assert w == Window(16, 481, 0, 16)  # the docs' example: 32 of 128 blocks
    assert round(w.memory_fraction(2048, 16) * 128) == 32
    assert round(Window(16, 482, 0, 16).memory_fraction(2048, 16) * 128) == 33
    assert window_for_blocks(1, 16, 2048, 16) is None  # the sink block alone is the budget
    assert window_for_blocks(128, 16, 2048, 16).window == 2048
    c = candidate_windows(2048, 16, (16, 64))
    assert len(set(c)) == len(c) and {w.sinks for w in c} == {16, 64}


def test_memory_fraction_of_a_config():
    cfg = PolicyConfig(Window(16, 481, 0, 16), {0: Window(16, 2048, 0, 16), 1: Window(16, 33, 0, 16)})
    per = [cfg.for_layer(i).memory_fraction(2048, 16) for i in range(4)]
    assert cfg.memory_fraction(4, 2048, 16) == pytest.approx(sum(per) / 4)
    for w in (Window(4, 40, 3, 4), Window(0, 9, 0, 4)):
        assert all(w.held_blocks(n, 4) == len(w.kept_blocks(n, 4)) for n in range(120))


def test_hull_drops_dominated_and_concave_points():
    costs = [2, 4, 6, 8, 10]
    errs = [1.0, 0.9, 0.3, 0.35, 0.0]  # 4 is barely better than 2, 8 is worse than 6
    assert _hull(costs, errs) == [0, 2, 4]


def _table(errs, sizes=(2, 4, 8, 16)):
    cands = [window_for_blocks(m, 4, 64, 4) for m in sizes]
    return WindowErrors(cands, errs, errs, 64, 4, 100, "test")


def test_greedy_allocation_spends_the_budget_where_error_drops_most():
    # layer 0 loses a lot with small windows, layer 1 little, layer 2 nothing
    errs = [[1.0, 0.5, 0.2, 0.0], [0.1, 0.05, 0.02, 0.0], [0.0, 0.0, 0.0, 0.0]]
    t = _table(errs)
    a = allocate_windows(t, 0.25)  # 0.25 · 3 · 16 = 12 blocks
    assert a.blocks == [8, 2, 2] and sum(a.blocks) <= 12
    assert a.memory_fraction == pytest.approx(12 / 48)
    assert a.config.for_layer(0) == t.candidates[2] and a.config.for_layer(2) == t.candidates[0]
    big = allocate_windows(t, 1.0)
    assert big.blocks == [16, 16, 2]  # no block is spent where it removes no error
    with pytest.raises(RarefyError, match="below the smallest windows"):
        allocate_windows(t, 0.1)
    with pytest.raises(RarefyError, match="unknown window error metric"):
        allocate_windows(t, 0.25, "kl")


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_budget_must_be_a_fraction(bad):
    with pytest.raises(RarefyError, match=r"\(0, 1\]"):
        check_budget(bad)


@pytest.mark.parametrize("ext", ["toml", "json"])
def test_config_file_round_trip(tmp_path, ext):
    w1, w2, w3 = Window(16, 481, 0, 16), Window(16, 97, 0, 16), Window(64, 2048, 0, 16)
    cfg = PolicyConfig(w1, {0: w2, 1: w2, 2: w2, 5: w3, 7: w2})
    path = str(tmp_path / f"w.{ext}")
    write_policy_config(cfg, path, ["budget 0.25"])
    back = load_policy_config(path)
    assert back.default == w1 and back.layers == cfg.layers
    if ext == "toml":
        with open(path) as f:
            text = f.read()
        assert text.startswith("# budget 0.25") and '"0-2" = ' in text
    with pytest.raises(RarefyError, match=".toml or .json"):
        policy_config_text(cfg, "w.yaml")


def test_error_table_round_trip(tmp_path):
    t = _table([[1.0, 0.5, 0.2, 0.0]])
    t.save(str(tmp_path / "e.json"))
    back = WindowErrors.load(str(tmp_path / "e.json"))
    assert back.candidates == t.candidates and back.out == t.out and back.blocks() == t.blocks()
    with pytest.raises(RarefyError, match="not found"):
        WindowErrors.load(str(tmp_path / "missing.json"))
    more = WindowErrors([window_for_blocks(4, 8, 64, 4), t.candidates[-1]], [[0.3, 0.0]], [[0.3, 0.0]], 64, 4,
                        50, "more sinks")
    m = t.merge(more)
    assert m.candidates == t.candidates + more.candidates[:1]  # the second is already there
    assert m.out == [[1.0, 0.5, 0.2, 0.0, 0.3]] and m.tokens == 50 and "more sinks" in m.source
    with pytest.raises(RarefyError, match="share ctx"):
        t.merge(WindowErrors(more.candidates, [[0.3, 0.0]], [[0.3, 0.0]], 128, 4, 50))


def test_measure_on_tiny_model(tiny_model_dir):
    from rarefy.models.loader import load_model

    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32).model
    chunks = torch.randint(3, model.config.vocab_size, (2, 64))
    cands = candidate_windows(64, 4, (4,), sizes=(2, 4, 8, 16))
    t = measure_window_errors(model, chunks, cands, "fp32")
    assert t.num_layers == 2 and t.tokens == 64
    for layer in range(2):
        assert t.out[layer][-1] == pytest.approx(0.0, abs=1e-9)  # the full window is dense
        assert t.cos[layer][-1] == pytest.approx(0.0, abs=1e-6)
        assert t.out[layer][0] > t.out[layer][-1] and t.cos[layer][0] > 0
    assert all(layer.self_attn.eval_attention is None for layer in model.model.layers)
    with pytest.raises(RarefyError, match="no 'grad' errors"):
        allocate_windows(t, 0.5, "grad")
    # grad: the first-order change of the mean NLL; the other metrics are unchanged
    tg = measure_window_errors(model, chunks, cands, "fp32", grad=True)
    for a, b in zip(tg.out, t.out):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-9)
    for layer in range(2):
        assert tg.grad[layer][-1] == pytest.approx(0.0, abs=1e-9)
    assert allocate_windows(tg, 0.5, "grad").memory_fraction <= 0.5


def test_cli(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rarefy.cli import app

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "w.toml"
    run = CliRunner().invoke
    args = ["calibrate-attention", "--model", str(tiny_model_dir), "--calib", str(text), "--ctx", "64",
            "--chunks", "2", "--kv-block-size", "4", "--sinks", "4", "--budget", "0.5", "--out", str(out),
            "--errors-out", str(tmp_path / "e.json")]
    r = run(app, args)
    assert r.exit_code == 0, r.output
    cfg = load_policy_config(str(out))
    assert cfg.memory_fraction(2, 64, 4) <= 0.5 and cfg.evicts
    # from the saved table, another budget, no model needed
    r = run(app, ["calibrate-attention", "--errors", str(tmp_path / "e.json"), "--budget", "0.3", "--sinks", "4",
                  "--out", str(tmp_path / "w2.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert load_policy_config(str(tmp_path / "w2.json")).memory_fraction(2, 64, 4) <= 0.3
    for bad, msg in [(["--budget", "0"], "(0, 1]"), (["--budget", "1.2"], "(0, 1]"),
                     (["--metric", "kl"], "--metric"), (["--chunks", "500"], "fewer than"),
                     (["--sinks", "a"], "integers")]:
        r = run(app, args[:-4] + bad + ["--out", str(tmp_path / "x.toml")])
        assert r.exit_code != 0 and msg in r.output, (bad, r.output)
    r = run(app, args)  # exists
    assert r.exit_code != 0 and "--overwrite" in r.output


def test_layer_sensitivity_is_the_loss_change_of_one_windowed_layer(tiny_model_dir):
    import torch.nn.functional as F

    from rarefy.kv.simulate import eval_attention
    from rarefy.kv.window_budget import measure_layer_sensitivity, scale_by_sensitivity
    from rarefy.models.loader import load_model

    torch.manual_seed(1)
    model = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32).model
    chunks = torch.randint(3, model.config.vocab_size, (2, 64))
    ref = Window(4, 9, 0, 4)
    sens = measure_layer_sensitivity(model, chunks, ref, "fp32")

    def nll(cfg):
        total = 0.0
        with torch.no_grad(), eval_attention(model, "fp32", cfg):
            for c in chunks:
                logits = model(c[None], last_index=torch.arange(31, 63)).float()
                total += float(F.cross_entropy(logits, c[32:], reduction="sum"))
        return total / 64

    base = nll(None)
    for layer in range(2):
        assert sens[layer] == pytest.approx(nll(PolicyConfig(layers={layer: ref})) - base, abs=1e-5)
    cands = candidate_windows(64, 4, (4,), sizes=(2, 4, 8, 16))
    assert ref in cands
    t = measure_window_errors(model, chunks, cands, "fp32")
    t.sensitivity, t.sens_ref = sens, ref
    scaled = t.metric("sens")
    c = cands.index(ref)
    for layer in range(2):
        assert scaled[layer][c] == pytest.approx(max(sens[layer], 1e-5))
    assert scale_by_sensitivity(t, sens, ref)[0] == scaled[0]
    back = WindowErrors.from_dict(t.to_dict())
    assert back.sens_ref == ref and back.sens == scaled
