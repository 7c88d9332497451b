"""`rarefy roofline`: hand-checked FLOPs and bytes, bounds, GPU mapping, CLI and bad input."""

import json

import pytest
from typer.testing import CliRunner

from rarefy.bench import decode_roofline as dr
from rarefy.bench.roofline import GPU, GPUS, lookup_gpu, pick_gpus
from rarefy.config import ModelConfig
from rarefy.errors import RarefyError
from rarefy.kv.quant import KV_DTYPES, bytes_per_token

# hidden 64, FFN 96, 2 layers, 4 query heads and 2 KV heads of 16, vocab 320
TINY = ModelConfig(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
TINY_SPEC = dr.ModelSpec(TINY, "tiny", "config")
# 1 TB/s and 100 TFLOP/s: ridge at 100 FLOP/byte
TOY_GPU = GPU("toy", 1.0, 100.0, sm_count=4, smem_per_sm_kib=228, smem_per_block_kib=227, l2_mb=1.0,
              memory_gb=1.0)


def _ops(ops):
    return {o["name"]: o for o in ops}


def test_projection_flops_and_bytes_by_hand():
    for b in (1, 3):
        ops = _ops(dr.layer_ops(TINY, b, 100, "bf16", "bf16", TOY_GPU))
        q, k, down = ops["q_proj"], ops["k_proj"], ops["down_proj"]
        assert (q["n"], q["k"], k["n"], down["n"], down["k"]) == (64, 64, 32, 64, 96)  # GQA: k is 2 x 16
        assert q["flops"] == 2 * b * 64 * 64
        assert q["weight_bytes"] == 64 * 64 * 2
        assert q["bytes"] == 64 * 64 * 2 + b * (64 + 64) * 2
        assert k["flops"] == 2 * b * 32 * 64
        assert down["flops"] == 2 * b * 64 * 96
    # int8: one byte per weight + a bf16 scale per row; ternary: 4 weights per byte + the scale
    assert _ops(dr.layer_ops(TINY, 1, 100, "bf16", "int8", TOY_GPU))["q_proj"]["weight_bytes"] == 64 * 64 + 64 * 2
    assert _ops(dr.layer_ops(TINY, 1, 100, "bf16", "ternary", TOY_GPU))["q_proj"]["weight_bytes"] == 64 * 64 / 4 + 128


def test_attention_by_hand():
    b, ctx = 2, 1000
    ops = _ops(dr.layer_ops(TINY, b, ctx, "bf16", "bf16", TOY_GPU))  # plan=None: no split reduction
    qk, pv = ops["attn_qk"], ops["attn_pv"]
    assert qk["kv_bytes"] == pv["kv_bytes"] == b * ctx * 2 * 16 * 2  # K (or V): ctx * kv_heads * D * 2 bytes
    assert qk["bytes"] == qk["kv_bytes"] + b * 4 * 16 * 2  # + the query
    assert pv["flops"] == 2 * b * 4 * ctx * 16
    assert qk["flops"] == 2 * b * 4 * ctx * 16 + 5 * b * 4 * ctx  # + softmax
    assert "attn_reduce" not in ops and qk["bound"] == pv["bound"] == "memory"


def test_step_kv_bytes_match_bytes_per_token():
    """Attention reads ctx * layers * 2 * kv_heads * D * bytes per sequence, as rarefy.kv.quant counts."""
    b, ctx = 3, 512
    for kv in KV_DTYPES:
        r = dr.decode_roofline(TINY_SPEC, gpu="h100", ctx=ctx, batch=b, kv_dtype=kv)
        per_token = bytes_per_token(kv, 2, 2, 16)
        assert r["settings"]["kv_bytes_per_token"] == per_token
        read = sum(o["kv_bytes"] for o in r["layer"]["ops"] if o["kind"] == "attention" and "kv_bytes" in o)
        assert read * 2 == b * ctx * per_token
        assert r["step"]["kv_bytes"] == b * ctx * per_token + b * per_token  # + the new token's write
        assert r["memory"]["kv_cache_bytes"] == b * ctx * per_token
    bf16 = dr.decode_roofline(TINY_SPEC, ctx=ctx, kv_dtype="bf16")["step"]["kv_bytes"]
    int8 = dr.decode_roofline(TINY_SPEC, ctx=ctx, kv_dtype="int8")["step"]["kv_bytes"]
    assert int8 / bf16 == pytest.approx((16 + 2) / 32)


def test_time_bounds_and_totals():
    r = dr.decode_roofline(TINY_SPEC, gpu="h200", ctx=300, batch=2)
    g = GPUS["h200"]
    for o in r["layer"]["ops"] + r["step_ops"]:
        assert o["time_s"] == pytest.approx(max(o["bytes"] / (g.bandwidth_tbs * 1e12), o["flops"] / (g.bf16_tflops * 1e12)))
    lt = r["layer"]["total"]
    assert lt["time_s"] == pytest.approx(sum(o["time_s"] for o in r["layer"]["ops"]))
    st = r["step"]
    assert st["time_s"] == pytest.approx(2 * lt["time_s"] + sum(o["time_s"] for o in r["step_ops"]))
    assert st["flops"] == pytest.approx(2 * lt["flops"] + sum(o["flops"] for o in r["step_ops"]))
    assert st["tokens_per_s"] == pytest.approx(2 / st["time_s"])
    assert st["roofline_time_s"] <= st["time_s"]
    assert r["gpu"]["ridge_flop_per_byte"] == pytest.approx(989 / 4.8)


def test_memory_bound_flips_to_compute_bound_as_batch_grows():
    spec = dr.resolve_model("llama3-8b")
    small = _ops(dr.decode_roofline(spec, gpu="h100", ctx=1024, batch=1)["layer"]["ops"])
    big = _ops(dr.decode_roofline(spec, gpu="h100", ctx=1024, batch=1024)["layer"]["ops"])
    for name in ("q_proj", "gate_proj", "down_proj"):
        assert small[name]["bound"] == "memory" and big[name]["bound"] == "compute"
        assert small[name]["intensity"] < 1.01 and big[name]["intensity"] > 295
    # each sequence reads its own cache: attention stays memory-bound at any batch (GQA group 4)
    assert big["attn_qk"]["bound"] == "memory" and big["attn_qk"]["intensity"] < 10
    # lower-bit weights move the flip to smaller batches
    mid = {w: _ops(dr.decode_roofline(spec, ctx=1024, batch=128, weights=w)["layer"]["ops"])["q_proj"]["bound"]
           for w in ("bf16", "ternary")}
    assert mid == {"bf16": "memory", "ternary": "compute"}


def test_presets_and_model_features():
    llama = dr.resolve_model("llama3-8b").config
    assert (llama.num_layers, llama.num_kv_heads, llama.head_dim, llama.vocab_size) == (32, 8, 128, 128256)
    q35 = dr.resolve_model("Qwen3.5-27B")
    assert q35.note and "approximation" in q35.note and q35.config.head_dim == 256
    r = dr.decode_roofline(q35, ctx=128)
    assert "qk_norm" in _ops(r["layer"]["ops"]) and r["model"]["qk_norm"]
    assert any("approximation" in n for n in r["notes"])
    r = dr.decode_roofline("llama3-8b", ctx=128)
    assert "qk_norm" not in _ops(r["layer"]["ops"])
    # tied embeddings: the LM head still reads V x H, but no separate matrix is resident
    tied = dr.decode_roofline("smollm2-135m", ctx=128)
    head = _ops(tied["step_ops"])["lm_head"]
    assert head["tied"] and head["weight_bytes"] == 49152 * 576 * 2
    untied = dr.ModelSpec(ModelConfig(**{**_fields(TINY), "tie_word_embeddings": False}), "t", "config")
    tied_t = dr.ModelSpec(ModelConfig(**{**_fields(TINY), "tie_word_embeddings": True}), "t", "config")
    diff = (dr.decode_roofline(untied, ctx=16)["memory"]["weights_bytes"]
            - dr.decode_roofline(tied_t, ctx=16)["memory"]["weights_bytes"])
    assert diff == 320 * 64 * 2


def _fields(cfg):
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def test_config_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)))
    r = dr.decode_roofline(str(tmp_path), ctx=64)
    assert r["model"]["kind"] == "config" and r["model"]["attention_bias"]
    q = _ops(r["layer"]["ops"])["q_proj"]
    assert q["weight_bytes"] == 128 * 128 * 2 + 128 * 2  # + the bias
    assert dr.decode_roofline(str(tmp_path / "config.json"), ctx=64)["step"] == r["step"]


def test_gpu_mapping():
    gemv1 = dr.gemv_launch(1, 4096, 4096, GPUS["h100"])
    assert gemv1["kernel"] == "rarefy Triton gemv" and gemv1["path"] == "FMA"
    assert gemv1["grid"] == [2048, 1, 1] and gemv1["tile"] == [1, 2, 1024] and gemv1["smem_bytes"] == 0
    gemv8 = dr.gemv_launch(8, 4096, 4096, GPUS["h100"])
    assert gemv8["tile"] == [16, 64, 128] and gemv8["smem_bytes"] == 6 * (64 + 16) * 128 * 2
    assert gemv8["programs_per_sm"] == 1 and gemv8["limited_by"] == "shared_memory"
    big = dr.gemv_launch(64, 4096, 4096, GPUS["h100"])
    assert big["kernel"].startswith("cuBLAS") and big["programs"] == 32
    r = dr.decode_roofline("llama3-8b", gpu="h100", ctx=32768, batch=1)
    a = r["mapping"]["attention"]
    assert "error" not in a, a.get("error")  # plan_decode exists: its launch must be reported
    splits = a["num_splits"]
    assert a["grid"] == [1, 8, splits] and a["programs"] == 8 * splits and a["waves"] > 0
    ops = _ops(r["layer"]["ops"])
    assert ("attn_reduce" in ops) == (splits > 1)
    if splits > 1:  # partial outputs are written by the main kernel and read by the reduction
        assert ops["attn_reduce"]["bytes"] == a["workspace_bytes"] + 32 * 128 * 2
    assert set(r["mapping"]["projections"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                "up_proj", "down_proj", "lm_head"}


def test_gpu_table():
    for g in GPUS.values():
        assert g.sm_count and g.smem_per_sm_kib and g.l2_mb and g.memory_gb and g.int8_tops
    assert GPUS["a100"].fp8_tflops is None and GPUS["h100"].fp8_tflops == pytest.approx(2 * GPUS["h100"].bf16_tflops, rel=0.01)
    assert lookup_gpu("H100-SXM").sm_count == 132 and lookup_gpu("B200").sm_count == 148
    assert pick_gpus("h200", None, 500)[0].bf16_tflops == 500  # analyze's override still works
    with pytest.raises(RarefyError, match="unknown GPU"):
        lookup_gpu("x100")


# -- the command line ---------------------------------------------------------------------------

def _run(*args):
    from rarefy.cli import app
    return CliRunner().invoke(app, ["roofline", *map(str, args)])


def _json(r):
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cli_default_model_and_preset():
    try:
        from rarefy.models.default_model import default_model_path
        default_model_path()
    except RarefyError as e:
        pytest.skip(str(e))
    d = _json(_run("--json", "--ctx", 256))
    assert d["model"]["kind"] == "checkpoint" and d["model"]["num_layers"] == 30
    assert d["step"]["tokens_per_s"] > 0
    d = _json(_run("--model", "llama3-8b", "--gpu", "b200", "--ctx", 8192, "--batch", 4,
                   "--kv-dtype", "fp8_e4m3", "--weights", "int8", "--json"))
    assert d["gpu"]["name"] == "B200" and d["settings"]["kv_dtype"] == "fp8_e4m3"
    assert d["settings"]["batch"] == 4 and len(d["layer"]["ops"]) >= 14
    text = _run("--model", "llama3-8b", "--ctx", 32768)
    assert text.exit_code == 0, text.output
    for s in ("one layer (x 32)", "q_proj", "attn_qk", "lm_head", "tok/s", "GPU mapping", "ridge 295"):
        assert s in text.stdout


@pytest.mark.parametrize("args, message", [
    (["--gpu", "x100"], "unknown GPU"),
    (["--ctx", "0"], "--ctx"),
    (["--ctx", "-5"], "--ctx"),
    (["--batch", "0"], "--batch"),
    (["--kv-dtype", "fp4"], "unknown KV-cache dtype"),
    (["--weights", "int4"], "unknown weight format"),
    (["--model", "/no/such/model"], "model not found"),
])
def test_cli_bad_input(args, message):
    r = _run("--model", "llama3-8b", *args) if "--model" not in args else _run(*args)
    assert r.exit_code == 1 and "error:" in r.output and message in r.output, r.output
    assert "Traceback" not in r.output
