"""`rarefy analyze`: every figure against a direct torch computation on small checkpoints."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

import rarefy.sparsity.analyze as A
from rarefy.bench import roofline
from rarefy.commands.analyze import analyze
from rarefy.errors import RarefyError
from rarefy.sparsity.analyze import AnalyzeOptions, analyze_checkpoint
from rarefy.sparsity.similarity import Sketcher

# name -> component the grouping rule must give
COMPONENT = {
    "model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head", "model.norm.weight": "norm",
    "self_attn.q_proj.weight": "q_proj", "self_attn.k_proj.weight": "k_proj", "self_attn.o_proj.weight": "o_proj",
    "mlp.up_proj.weight": "up_proj", "mlp.down_proj.weight": "down_proj", "input_layernorm.weight": "input_layernorm",
    "linear_attn.in_proj_qkvz.weight": "in_proj_qkvz", "linear_attn.A_log": "A_log",
    "linear_attn.conv1d.weight": "conv1d", "self_attn.o_proj.bias": "o_proj.bias",
}


def _component(name):
    return COMPONENT[name] if name in COMPONENT else COMPONENT[name.split(".", 3)[3]]


def make_tensors(seed=0):
    """A hybrid-looking model: layers 0-2 linear attention, layer 3 full attention; bf16, fp16
    and fp32 tensors; shapes not divisible by the block sizes; q_proj 0..2 nearly shared."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    t = {"model.embed_tokens.weight": rnd(50, 36).half(), "lm_head.weight": rnd(50, 36).bfloat16(),
         "model.norm.weight": (1 + rnd(36, std=0.1)).float()}
    q = rnd(40, 36)
    for i in range(4):
        p = f"model.layers.{i}."
        q = q + rnd(40, 36, std=0.002) if i < 3 else rnd(40, 36)  # cos ~0.995 between 0-1, 1-2
        t[p + "self_attn.q_proj.weight"] = q.bfloat16()
        down = rnd(36, 70)
        if i == 3:
            down[:, :20] = 0  # exact zeros
        t[p + "mlp.down_proj.weight"] = down.bfloat16()
        t[p + "input_layernorm.weight"] = (1 + rnd(36, std=0.1)).bfloat16()
        if i < 3:
            t[p + "linear_attn.in_proj_qkvz.weight"] = rnd(48, 36).bfloat16()
            t[p + "linear_attn.A_log"] = rnd(4, std=1.0)
            conv = rnd(24, 1, 4, std=0.01)
            conv[0, 0, :] = float(np.float32(0.01))  # float32(0.01) < 0.01: counts as below it
            t[p + "linear_attn.conv1d.weight"] = conv
        if i < 2:
            t[p + "mlp.up_proj.weight"] = rnd(302, 1000).bfloat16()  # two row chunks, 302 % 4 != 0
    t["model.layers.3.self_attn.k_proj.weight"] = rnd(8, 36).bfloat16()
    t["model.layers.3.self_attn.o_proj.weight"] = rnd(36, 40).half()
    t["model.layers.3.self_attn.o_proj.bias"] = rnd(36).bfloat16()
    return t


def write_sharded(path, tensors, extra=None):
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, keys in shards.items():
        part = {k: tensors[k].contiguous() for k in keys}
        if extra and file.startswith("model-00002"):
            part.update(extra)
        save_file(part, os.path.join(path, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tensors = make_tensors()
    path = write_sharded(tmp_path_factory.mktemp("hybrid"), tensors,
                         extra={"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(40, dtype=torch.int8)})
    return path, tensors


@pytest.fixture(scope="module")
def result(ckpt):
    return analyze_checkpoint(str(ckpt[0]))


# -- direct computations --------------------------------------------------------------------

def _matrix(w):
    return w.reshape(w.shape[0], -1) if w.dim() >= 2 else None


def _prune(w, s):
    """tau = k-th smallest |w| (k = ceil(s n)); weights <= tau pruned."""
    a = w.double().abs().reshape(-1)
    k = math.ceil(s * a.numel() - 1e-9)
    tau = torch.kthvalue(a, k).values
    return a, tau, int((a <= tau).sum()), float(a[a <= tau].sum())


def _blocks(w, s, b):
    """(zero blocks, blocks, real weights in the lowest-L1 blocks within the pruned mass)."""
    m = _matrix(w).double().abs()
    _, tau, _, mass = _prune(w, s)
    r, c = -(-m.shape[0] // b) * b, -(-m.shape[1] // b) * b
    p, real = torch.zeros(r, c, dtype=torch.float64), torch.zeros(r, c, dtype=torch.float64)
    p[: m.shape[0], : m.shape[1]], real[: m.shape[0], : m.shape[1]] = m, 1
    tiles = p.view(r // b, b, c // b, b).permute(0, 2, 1, 3).reshape(-1, b * b)
    real = real.view(r // b, b, c // b, b).permute(0, 2, 1, 3).reshape(-1, b * b).sum(1)
    order = torch.argsort(tiles.sum(1), stable=True)
    fits = int((torch.cumsum(tiles.sum(1)[order], 0) <= mass).sum())
    return int((tiles <= tau).all(1).sum()), tiles.shape[0], int(real[order][:fits].sum())


def _groups(tensors):
    out = {}
    for name, w in tensors.items():
        out.setdefault(_component(name), []).append(w)
    return out


def test_components_and_counts(result, ckpt):
    _, tensors = ckpt
    groups = _groups(tensors)
    comps = result["components"]
    assert set(comps) == set(groups) | {"all"}
    assert list(comps)[:5] == ["embed_tokens", "q_proj", "k_proj", "o_proj", "up_proj"]  # canonical order
    assert result["skipped"] == ["model.layers.0.self_attn.q_proj.weight_scale"]
    for name, ws in groups.items():
        assert comps[name]["tensors"] == len(ws)
        assert comps[name]["params"] == sum(w.numel() for w in ws)
    assert comps["all"]["params"] == sum(w.numel() for w in tensors.values())
    assert result["bytes_read"] == sum(w.numel() * w.element_size() for w in tensors.values())


def test_threshold_shares(result, ckpt):
    _, tensors = ckpt
    o = result["options"]
    for name, ws in _groups(tensors).items():
        c, n = result["components"][name], sum(w.numel() for w in ws)
        for t in o["thresholds"]:
            want = sum(int((w.double().abs() < t).sum()) for w in ws) / n
            assert c["below_abs"][f"{t:g}"] == pytest.approx(want, abs=1e-12), (name, t)
        for f in o["rel_thresholds"]:
            want = sum(int((w.double().abs() < f * w.double().pow(2).mean().sqrt()).sum()) for w in ws) / n
            assert c["below_rel"][f"{f:g}"] == pytest.approx(want, abs=1e-12), (name, f)
        rms = math.sqrt(sum(float(w.double().pow(2).sum()) for w in ws) / n)
        assert c["rms"] == pytest.approx(rms, rel=1e-9)
        assert c["zeros"] == pytest.approx(sum(int((w == 0).sum()) for w in ws) / n)
    assert result["components"]["down_proj"]["zeros"] > 0.05


def test_block_density(result, ckpt):
    _, tensors = ckpt
    o = result["options"]
    for name, ws in _groups(tensors).items():
        mats = [w for w in ws if w.dim() >= 2]
        c = result["components"][name]
        if not mats:
            assert all(e["achieved"] is None for e in c["block_density"])
            continue
        n = sum(w.numel() for w in mats)
        for e, s in zip(c["block_density"], o["sparsities"]):
            assert e["achieved"] == pytest.approx(sum(_prune(w, s)[2] for w in mats) / n, abs=1e-12)
            for b in o["blocks"]:
                ref = [_blocks(w, s, b) for w in mats]
                assert e["zero_block_share"][str(b)] == pytest.approx(
                    sum(r[0] for r in ref) / sum(r[1] for r in ref), abs=1e-12), (name, s, b)
                # block L1 sums are float32 in the scan: allow one block of rounding per matrix
                assert round(e["block_sparsity"][str(b)] * n) == sum(r[2] for r in ref), (name, s, b)
    assert 0 < result["components"]["up_proj"]["block_density"][1]["zero_block_share"]["4"]


def test_per_tensor_tau(result, ckpt):
    _, tensors = ckpt
    for t in result["tensor_stats"]:
        for p in t["prune"]:
            _, tau, pruned, _ = _prune(tensors[t["name"]], p["sparsity"])
            assert p["tau"] == float(tau) and p["pruned"] == pruned


def _cos(ws):
    v = torch.stack([w.double().reshape(-1) for w in ws])
    g = v @ v.T
    return g / torch.outer(g.diagonal().sqrt(), g.diagonal().sqrt())


def _spans(cos, layers, thr):
    out, i = [], 0
    while i < len(layers) - 1:
        j = i
        while j < len(layers) - 1 and cos[j, j + 1] >= thr:
            j += 1
        if j > i:
            out.append((layers[i], layers[j]))
        i = j + 1
    return out


def test_similarity_exact(result, ckpt):
    _, tensors = ckpt
    sims = {s["series"]: s for s in result["similarity"]}
    assert set(sims) == {f"model.layers.*.{p}" for p in (
        "self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "mlp.up_proj.weight",
        "linear_attn.in_proj_qkvz.weight", "linear_attn.A_log", "linear_attn.conv1d.weight")}
    for series, s in sims.items():
        layers = sorted(int(k.split(".")[2]) for k in tensors if A.series_of(k) == series)
        assert s["layers"] == layers and s["mode"] == "exact"
        ref = _cos([tensors[series.replace("*", str(i))] for i in layers])
        assert np.allclose(np.array(s["cosine"], dtype=float), ref.numpy(), atol=2e-6)
        assert [(p["start"], p["end"]) for p in s["spans"]] == _spans(ref, layers, 0.95)
    assert [(p["start"], p["end"]) for p in sims["model.layers.*.self_attn.q_proj.weight"]["spans"]] == [(0, 2)]


def test_similarity_sketch_mode(ckpt):
    """Budget 0: every matrix series is sketched; cosines within the documented error."""
    path, tensors = ckpt
    r = analyze_checkpoint(str(path), AnalyzeOptions(similarity_budget=0, sketch_rows=4, sketch_cols=64))
    for s in r["similarity"]:
        ref = _cos([tensors[s["series"].replace("*", str(i))] for i in s["layers"]]).numpy()
        got = np.array(s["cosine"], dtype=float)
        if s["series"].endswith(("A_log", "layernorm.weight")):  # 1-D: always exact
            assert s["mode"] == "exact"
            continue
        assert s["mode"] == "sketch" and s["sketch_dim"] <= 4 * 64
        assert np.all(np.abs(got - ref) <= 6 * (1 - ref ** 2) / math.sqrt(s["sketch_dim"]) + 1e-6), s["series"]


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, 0.99])
def test_sketch_error_matches_documented(rho):
    """RMS error of the sketched cosine ~ (1 - rho^2) / sqrt(k), also with heavy rows/columns."""
    g = torch.Generator().manual_seed(1)
    sk = Sketcher(512, 1024, seed=3, k_rows=8, k_cols=256)
    errs = []
    for _ in range(12):
        scale = torch.rand(512, 1, generator=g) ** 4 * 10 * (torch.rand(1, 1024, generator=g) ** 4 * 10)
        x, z = torch.randn(512, 1024, generator=g) * scale, torch.randn(512, 1024, generator=g) * scale
        y = rho * x / x.norm() + math.sqrt(1 - rho ** 2) * z / z.norm()
        true = float((x.double() * y.double()).sum() / (x.double().norm() * y.double().norm()))
        sx, sy = sk.sketch(x), sk.sketch(y)
        errs.append(float(sx @ sy / (sx.norm() * sy.norm())) - true)
    rms = math.sqrt(sum(e * e for e in errs) / len(errs))
    assert rms < 2.5 * (1 - rho ** 2) / math.sqrt(sk.dim) + 2e-4


def test_sketch_is_unbiased_and_linear():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 600, generator=g), torch.randn(40, 600, generator=g)
    sk = Sketcher(40, 600, seed=0, k_rows=4, k_cols=32)
    assert torch.allclose(sk.sketch(x + 2 * y), sk.sketch(x) + 2 * sk.sketch(y), atol=1e-4)
    ests = [float(Sketcher(40, 600, seed=s, k_rows=4, k_cols=32).sketch(x) @
                  Sketcher(40, 600, seed=s, k_rows=4, k_cols=32).sketch(y)) for s in range(200)]
    true = float((x.double() * y.double()).sum())
    assert abs(np.mean(ests) - true) < 4 * np.std(ests) / math.sqrt(len(ests))


def test_native_and_torch_paths_agree(ckpt, monkeypatch):
    """The C scan and the torch fallback give the same figures; many small chunks as well."""
    path, _ = ckpt
    monkeypatch.setattr(A, "CHUNK_ELEMS", 512)  # forces many row chunks per tensor
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("RAREFY_NATIVE", native)
        runs.append(analyze_checkpoint(str(path), AnalyzeOptions(similarity_budget=0, sketch_rows=4, sketch_cols=64)))
    a, b = runs
    for k in a["components"]:
        for f in ("params", "below_abs", "below_rel", "rms", "zeros", "log_hist"):
            assert a["components"][k][f] == pytest.approx(b["components"][k][f], rel=1e-9)
        for ea, eb in zip(a["components"][k]["block_density"], b["components"][k]["block_density"]):
            assert ea["zero_block_share"] == eb["zero_block_share"]
            for bs in ea["block_sparsity"]:
                assert ea["block_sparsity"][bs] == pytest.approx(eb["block_sparsity"][bs], abs=1e-3)
    for sa, sb in zip(a["similarity"], b["similarity"]):
        assert np.allclose(np.array(sa["cosine"], float), np.array(sb["cosine"], float), atol=1e-5)


def test_gguf_checkpoint(tmp_path):
    """GGUF tensors (float32 path) against GGUFCheckpoint.load."""
    gguf = pytest.importorskip("gguf")
    from rarefy.models.gguf_file import GGUFCheckpoint
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for k, v in (("block_count", 2), ("context_length", 32), ("embedding_length", 16),
                 ("feed_forward_length", 24), ("head_count", 2)):
        getattr(w, f"add_{k}")(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", (rng.standard_normal((32, 16)) * 0.02).astype(np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.ffn_up.weight", (rng.standard_normal((24, 16)) * 0.02).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(16, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    r = analyze_checkpoint(str(tmp_path / "m.gguf"))
    ck = GGUFCheckpoint(tmp_path / "m.gguf")
    ups = [ck.load(f"model.layers.{i}.mlp.up_proj.weight") for i in range(2)]
    c = r["components"]["up_proj"]
    assert r["format"] == "gguf" and c["tensors"] == 2
    assert c["below_abs"]["0.01"] == pytest.approx(sum(int((u.double().abs() < 0.01).sum()) for u in ups) / 768)
    assert c["block_density"][0]["achieved"] == pytest.approx(sum(_prune(u, 0.5)[2] for u in ups) / 768)
    for b in (4, 16):
        ref = [_blocks(u, 0.5, b) for u in ups]
        assert c["block_density"][0]["zero_block_share"][str(b)] == pytest.approx(
            sum(x[0] for x in ref) / sum(x[1] for x in ref))
    s = next(s for s in r["similarity"] if "up_proj" in s["series"])
    assert s["cosine"][0][1] == pytest.approx(float(_cos(ups)[0, 1]), abs=1e-6)
    assert r["napkin"]["tied_embeddings"] is True


# -- napkin math ----------------------------------------------------------------------------

def _napkin_tensors():
    """Layer 0 full attention, layer 1 linear attention; hidden 64, vocab 1000, untied."""
    t = [("model.embed_tokens.weight", (1000, 64)), ("model.norm.weight", (64,)), ("lm_head.weight", (1000, 64))]
    mlp = [("mlp.gate_proj.weight", (128, 64)), ("mlp.up_proj.weight", (128, 64)), ("mlp.down_proj.weight", (64, 128)),
           ("input_layernorm.weight", (64,))]
    t += [(f"model.layers.0.{n}", s) for n, s in [
        ("self_attn.q_proj.weight", (64, 64)), ("self_attn.k_proj.weight", (16, 64)),
        ("self_attn.v_proj.weight", (16, 64)), ("self_attn.o_proj.weight", (64, 64)), *mlp]]
    t += [(f"model.layers.1.{n}", s) for n, s in [
        ("linear_attn.in_proj.weight", (192, 64)), ("linear_attn.out_proj.weight", (64, 64)),
        ("linear_attn.A_log", (4,)), *mlp]]
    return t


def test_napkin_by_hand():
    n = roofline.napkin(_napkin_tensors())
    # matrices: layer 0 4096+1024+1024+4096+3*8192 = 34816 (rows 480); layer 1 12288+4096+24576
    # = 40960 (rows 576); lm_head 64000 (rows 1000) -> 139776 weights, 2056 rows.
    # other: one embedding row 64 + norms 64+64+64 + A_log 4 = 260 (bf16).
    rows = {(r["format"], r["sparsity"]): r for r in n["rows"]}
    assert n["params_per_token"] == 139776 + 260
    assert rows["bf16", 0.0]["bytes_per_token"] == 139776 * 2 + 260 * 2 == 280072
    assert rows["int8", 0.0]["bytes_per_token"] == 139776 + 2056 * 2 + 520 == 144408
    assert rows["ternary", 0.0]["bytes_per_token"] == 139776 // 4 + 2056 * 2 + 520 == 39576
    assert rows["bf16", 0.5]["bytes_per_token"] == 139776 * 9 / 8 + 520 == 157768  # 1 + 8 bits
    assert rows["int8", 0.75]["bytes_per_token"] == 139776 * 3 / 8 + 4112 + 520 == 57048  # 1 + 2 bits
    assert rows["ternary", 0.9]["bytes_per_token"] == pytest.approx(139776 * 1.2 / 8 + 4632)  # 1 + 0.2
    h100 = rows["bf16", 0.0]["gpus"]["H100 SXM"]
    assert h100["ms_per_token"] == pytest.approx(280072 / 3.35e12 * 1e3)
    assert h100["tok_s"] == pytest.approx(3.35e12 / 280072)
    assert h100["compute_ms_per_token"] == pytest.approx(2 * 139776 / 989e12 * 1e3)
    assert rows["bf16", 0.5]["gpus"]["B200"]["compute_ms_per_token"] == pytest.approx(139776 / 2250e12 * 1e3)
    assert rows["int8", 0.0]["gpus"]["A100"]["ms_per_token"] == pytest.approx(144408 / 2.0e12 * 1e3)
    types = {t["type"]: t for t in n["layer_types"]}
    assert set(types) == {"mlp+self_attn", "linear_attn+mlp"}
    assert types["mlp+self_attn"]["layers"] == [0] and types["linear_attn+mlp"]["layers"] == [1]
    assert types["mlp+self_attn"]["bytes_per_token"]["bf16@0"] == (34816 + 64) * 2
    assert types["linear_attn+mlp"]["bytes_per_token"]["bf16@0"] == (40960 + 68) * 2
    assert types["mlp+self_attn"]["kv_bytes_per_token"] == (16 + 16) * 2 * 4096
    assert types["linear_attn+mlp"]["kv_bytes_per_token"] == 0


def test_napkin_tied_and_moe():
    t = [("model.embed_tokens.weight", (100, 8)), ("model.layers.0.mlp.experts.0.up_proj.weight", (16, 8)),
         ("model.layers.0.mlp.experts.1.up_proj.weight", (16, 8)), ("model.layers.0.self_attn.q_proj.weight", (8, 8)),
         ("model.visual.blocks.0.attn.qkv.weight", (24, 8))]
    n = roofline.napkin(t, {"num_experts": 8, "num_experts_per_tok": 2}, gpus=roofline.pick_gpus(None, 1.0))
    # tied: embedding read in full (800) plus one row (8); experts at 2/8 of 256; q 64
    assert n["tied_embeddings"] and n["active_expert_share"] == 0.25
    assert n["params_per_token"] == 800 + 8 + 64 + 64 and n["params_not_read"] == 192  # vision tower
    bf16 = n["rows"][0]
    assert bf16["bytes_per_token"] == 2 * 936 and bf16["gpus"]["1 TB/s"]["compute_ms_per_token"] is None


def test_pick_gpus():
    assert [g.name for g in roofline.pick_gpus(None, None)] == ["H100 SXM", "H200", "B200", "A100"]
    assert roofline.pick_gpus("H100-SXM", None)[0].bf16_tflops == 989
    assert roofline.pick_gpus(None, 3.0, 500)[0].bandwidth_tbs == 3.0
    for args in [("x100", None), ("h100", 3.0), (None, -1.0)]:
        with pytest.raises(RarefyError):
            roofline.pick_gpus(*args)


# -- the command ----------------------------------------------------------------------------

def _app():
    app = typer.Typer()
    app.command("analyze")(analyze)
    app.command("noop")(lambda: None)  # two commands: `analyze` stays a subcommand, as in rarefy.cli
    return app


def test_cli_text_json_and_plots(ckpt, tmp_path):
    path, _ = ckpt
    r = CliRunner().invoke(_app(), ["analyze", "--model", str(path), "--json", "--plots", str(tmp_path / "p"),
                                    "--gpu", "h200", "--sparsities", "0.6", "--blocks", "4,8"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["options"]["sparsities"] == [0.6] and d["options"]["blocks"] == [4, 8]
    assert [g["name"] for g in d["napkin"]["gpus"]] == ["H200"]
    for text in ("Weight magnitudes", "Block density", "Layer similarity", "Napkin math", "in_proj_qkvz",
                 "linear_attn+mlp", "spans: 0-2"):
        assert text in r.stdout
    pngs = sorted(os.listdir(tmp_path / "p"))
    assert "hist_q_proj.png" in pngs and "sim_model.layers._.self_attn.q_proj.weight.png" in pngs
    assert len(pngs) == len(d["plots"]) == len(d["components"]) + len(d["similarity"])
    for p in pngs:
        with open(tmp_path / "p" / p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(tmp_path / "p" / p) > 1000


@pytest.mark.parametrize("args, message", [
    (["--thresholds", "abc"], "comma-separated numbers"),
    (["--thresholds", "0.01,-1"], "outside"),
    (["--rel-thresholds", "0"], "outside"),
    (["--sparsities", "1.0"], "outside"),
    (["--sparsities", "0.5,1.5"], "outside"),
    (["--blocks", "6"], "multiples of 4"),
    (["--gpu", "x100"], "unknown GPU"),
    (["--gpu", "h100", "--bandwidth", "3"], "not both"),
    (["--bandwidth", "0"], "positive"),
    (["--similarity-threshold", "2"], "similarity-threshold"),
])
def test_bad_options(ckpt, args, message):
    r = CliRunner().invoke(_app(), ["analyze", "--model", str(ckpt[0]), *args])
    assert r.exit_code == 1 and "error:" in r.output and message in r.output, r.output


def test_bad_paths(ckpt, tmp_path):
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(_app(), ["analyze", "--model", str(ckpt[0]), "--plots", str(tmp_path / "file" / "p")])
    assert r.exit_code == 1 and "--plots" in r.output
    r = CliRunner().invoke(_app(), ["analyze", "--model", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such checkpoint" in r.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nope")
    r = CliRunner().invoke(_app(), ["analyze", "--model", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output


# -- memory ---------------------------------------------------------------------------------

RSS_PROBE = r"""
import json, sys, torch
import rarefy.sparsity.analyze as A

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

# Warm up on a tiny checkpoint of the same kind: the code pages of every op used count too.
import os, tempfile
from safetensors.torch import save_file
tiny = tempfile.mkdtemp()
save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 128).bfloat16() for i in range(2)},
          os.path.join(tiny, "model.safetensors"))
A.analyze_checkpoint(tiny, A.AnalyzeOptions(similarity_budget=0))
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: imports' transient peaks don't count
r = A.analyze_checkpoint(sys.argv[1], A.AnalyzeOptions(similarity_budget=int(sys.argv[2])))
print(json.dumps({"grew": status("VmHWM") - base, "read": r["bytes_read"],
                  "largest": max(t["numel"] for t in r["tensor_stats"]) * 2}))
"""


def test_peak_rss_streams(tmp_path):
    """200 MB of bf16 in 50 MB shards: RSS grows by a fraction of the largest tensor, not the file."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.{p}.weight": (torch.randn(2048, 4096, generator=g) * 0.02).bfloat16()
               for i in range(4) for p in ("up_proj", "down_proj", "gate_proj")}
    weight_map = {}
    for j, name in enumerate(sorted(tensors)):
        file = f"model-{j // 3:05d}.safetensors"
        weight_map[name] = file
    for file in set(weight_map.values()):
        save_file({k: tensors[k] for k, f in weight_map.items() if f == file}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    del tensors
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path), "0"], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["read"] > 200e6
    # per thread a block grid and small buffers, plus one sketch per matrix; the file is 12x this
    assert r["grew"] < 2.5 * r["largest"], r
