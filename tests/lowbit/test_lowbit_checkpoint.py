"""Low-bit checkpoints: round trip, metadata, the loader reading metadata, safety."""

import json
import shutil

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.layers.half_weight_linear import HalfWeightLinear
from rarefy.layers.linear import DenseLinear
from rarefy.layers.lowbit_linear import Int8Linear, TernaryLinear
from rarefy.lowbit.checkpoint import read_lowbit_metadata, save_lowbit
from rarefy.lowbit.quantize import quantize_model
from rarefy.models.loader import load_model
from tests.conftest import VOCAB, make_random_checkpoint, write_tiny_tokenizer


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("lb_src")
    make_random_checkpoint("llama3", path)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tied_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("lb_tied")
    make_random_checkpoint("qwen2", path)  # tied embeddings, q/k/v biases
    write_tiny_tokenizer(path)
    return path


IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))


def _quantized(path, fmt, group, skip=("lm_head",)):
    loaded = load_model(path, dtype="fp32")
    rep = quantize_model(loaded.model, fmt, group, skip)
    return loaded, rep


@pytest.mark.parametrize("fmt,group", [("ternary", None), ("ternary", 16), ("int8", None), ("int8", 32)])
def test_round_trip_is_exact_and_metadata_complete(src, tmp_path, fmt, group):
    loaded, rep = _quantized(src, fmt, group, skip=("lm_head", "*.layers.1.mlp.down_proj"))
    with torch.no_grad():
        want = loaded.model(IDS)
    meta_in = {"format": fmt, "group_size": group, "skip": ["lm_head"], "skipped": rep.skipped}
    summary = save_lowbit(loaded.model, tmp_path / "q", source_path=src, tokenizer_files_from=loaded.tokenizer,
                          lowbit_meta=meta_in, dtype=torch.float32)
    assert summary["lowbit_modules"] == 13
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    r = cfg["rarefy"]
    assert r["weights_format"] == "lowbit" and r["source_model"] == str(src.resolve())
    lb = r["lowbit"]
    assert lb["format"] == fmt and lb["group_size"] == group and lb["layout_version"] == 1
    assert lb["skipped"] == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert len(lb["modules"]) == 13 and "lm_head" not in lb["modules"]
    spec = lb["modules"]["model.layers.0.mlp.up_proj"]
    assert spec == {"format": fmt, "shape": [96, 64], "group_size": group, "act_quant": None,
                    "scale_dtype": "float32"}
    packed = sum(b.numel() * b.element_size() for n, b in loaded.model.named_buffers()
                 if n.endswith(("weight_ternary", "weight_int8", "weight_scale")))
    assert r["measured"]["lowbit_bytes"] == packed
    attn, mlp = 2 * 64 * 64 + 2 * 32 * 64, 3 * 64 * 96  # q,o 64x64; k,v 32x64 (2 kv heads)
    assert r["measured"]["lowbit_bf16_bytes"] == 2 * (2 * (attn + mlp) - 96 * 64)
    assert read_lowbit_metadata(tmp_path / "q") == lb

    back = load_model(tmp_path / "q", dtype="fp32")
    cls = TernaryLinear if fmt == "ternary" else Int8Linear
    assert sum(isinstance(m, cls) for m in back.model.modules()) == 13
    assert isinstance(back.model.model.layers[1].mlp.down_proj, DenseLinear)
    assert all(m.mode == "cache" for m in back.model.modules() if isinstance(m, cls))
    with torch.no_grad():
        assert torch.equal(back.model(IDS), want)
    assert back.tokenizer.encode("The quick") == loaded.tokenizer.encode("The quick")


def test_reference_mode_from_the_environment(src, tmp_path, monkeypatch):
    loaded, _ = _quantized(src, "int8", None)
    save_lowbit(loaded.model, tmp_path / "q", source_path=src)
    monkeypatch.setenv("RAREFY_LOWBIT_MODE", "reference")
    m = load_model(tmp_path / "q", dtype="fp32", with_tokenizer=False).model
    assert all(x.mode == "reference" and x.weight_cache is None for x in m.modules() if isinstance(x, Int8Linear))
    with torch.no_grad():
        assert torch.equal(m(IDS), loaded.model(IDS))
    monkeypatch.setenv("RAREFY_LOWBIT_MODE", "turbo")
    with pytest.raises(RarefyError, match="RAREFY_LOWBIT_MODE"):
        load_model(tmp_path / "q", with_tokenizer=False)


def test_auto_dtype_keeps_dense_projections_in_fp16(src, tmp_path):
    loaded, _ = _quantized(src, "ternary", None)
    save_lowbit(loaded.model, tmp_path / "q", source_path=src)
    m = load_model(tmp_path / "q", with_tokenizer=False).model  # auto: fp16w on the CPU when the kernel builds
    assert isinstance(m.model.layers[0].self_attn.q_proj, TernaryLinear)
    from rarefy.kernels.gemv_cpu import available
    assert isinstance(m.lm_head, HalfWeightLinear if available() else DenseLinear)


def test_tied_model_with_biases(tied_src, tmp_path):
    loaded, rep = _quantized(tied_src, "int8", 16, skip=())
    assert "lm_head" in rep.skipped and any("tied" in w for w in rep.warnings)
    assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        want = loaded.model(IDS)
    save_lowbit(loaded.model, tmp_path / "q", source_path=tied_src)
    back = load_model(tmp_path / "q", dtype="fp32", with_tokenizer=False).model
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(IDS), want)


def test_loading_reads_the_metadata_not_names(src, tmp_path):
    loaded, _ = _quantized(src, "ternary", 16)
    save_lowbit(loaded.model, tmp_path / "int8-model", source_path=src)  # a misleading directory name
    m = load_model(tmp_path / "int8-model", dtype="fp32", with_tokenizer=False).model
    assert isinstance(m.model.layers[0].mlp.gate_proj, TernaryLinear)
    assert m.model.layers[0].mlp.gate_proj.group_size == 16
    # without the metadata the packed tensors are not guessed from their names
    cfg_file = tmp_path / "int8-model" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["rarefy"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(RarefyError, match="lacks"):
        load_model(tmp_path / "int8-model", with_tokenizer=False)


def _edit_meta(path, fn):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg["rarefy"]["lowbit"])
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,msg", [
    (lambda lb: lb.update(layout_version=2), "newer rarefy"),
    (lambda lb: lb["modules"]["model.layers.0.mlp.up_proj"].update(format="int3"), "unknown low-bit format"),
    (lambda lb: lb["modules"]["model.layers.0.mlp.up_proj"].update(shape=[64, 96]), "config expects"),
    (lambda lb: lb["modules"]["model.layers.0.mlp.up_proj"].update(group_size=6), "group size"),
    (lambda lb: lb["modules"].update({"model.layers.0.mlp.act": lb["modules"]["model.layers.0.mlp.up_proj"]}),
     "not a projection"),
    (lambda lb: lb.pop("modules"), "modules table"),
])
def test_damaged_metadata_is_reported(src, tmp_path, edit, msg):
    loaded, _ = _quantized(src, "ternary", 16)
    save_lowbit(loaded.model, tmp_path / "q", source_path=src)
    _edit_meta(tmp_path / "q", edit)
    with pytest.raises(RarefyError, match=msg):
        load_model(tmp_path / "q", with_tokenizer=False)


def test_invalid_codes_in_the_file_are_reported(src, tmp_path):
    from safetensors.torch import load_file, save_file
    loaded, _ = _quantized(src, "ternary", None)
    save_lowbit(loaded.model, tmp_path / "q", source_path=src)
    f = tmp_path / "q" / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.self_attn.o_proj.weight_ternary"][0, 0] = 0xFF
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(RarefyError, match="o_proj.weight_ternary.*invalid"):
        load_model(tmp_path / "q", with_tokenizer=False)


def test_sharded_round_trip(src, tmp_path):
    loaded, _ = _quantized(src, "int8", None)
    with torch.no_grad():
        want = loaded.model(IDS)
    s = save_lowbit(loaded.model, tmp_path / "q", source_path=src, shard_size_bytes=20_000)
    assert len(s["files"]) > 2 and (tmp_path / "q" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    for mod in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):  # parts stay together
        assert index[f"{mod}.weight_int8"] == index[f"{mod}.weight_scale"]
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "q", dtype="fp32", with_tokenizer=False).model(IDS), want)


def test_destination_rules_and_atomicity(src, tmp_path, monkeypatch):
    loaded, _ = _quantized(src, "int8", None)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    with pytest.raises(RarefyError, match="input"):
        save_lowbit(loaded.model, src, source_path=src, overwrite=True)
    with pytest.raises(RarefyError, match="contains the input"):
        save_lowbit(loaded.model, src.parent, source_path=src, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RarefyError, match="not empty"):
        save_lowbit(loaded.model, out, source_path=src)
    # a failure halfway leaves the old directory as it was and no temp directory behind
    import rarefy.formats.checkpoint as ck  # where the savers write config.json

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(ck, "_write_json", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_lowbit(loaded.model, out, source_path=src, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.undo()
    save_lowbit(loaded.model, out, source_path=src, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    shutil.rmtree(out)


def test_fused_model_cannot_be_saved(src, tmp_path):
    loaded, _ = _quantized(src, "int8", None, skip=("*",))  # everything dense, so it fuses
    loaded.model.fuse_projections()
    with pytest.raises(RarefyError, match="HF names"):
        save_lowbit(loaded.model, tmp_path / "q", source_path=src)
