"""sparse-bitmask encoding, compressed checkpoints (save_pruned) and reading them back.

Compatibility with compressed-tensors: 0.15+ (0.20.0 is the latest) ships only the
bit-packing helpers and the config class of this format; its compressor, and with it the
decompress API, was last released in 0.14.0.1. The in-process tests use whichever version
is installed; the decompress/compress round trips run the 0.14.0.1 compressor in a
subprocess from RAREFY_CT_LEGACY (a `pip install --no-deps --target DIR
compressed-tensors==0.14.0.1`), default ~/.cache/rarefy/compressed-tensors-0.14.0.1.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rarefy.errors import RarefyError
from rarefy.formats import checkpoint
from rarefy.formats.checkpoint import file_sha256, save_pruned
from rarefy.formats.sparse_bitmask import decode_bitmask, encode_bitmask, pack_mask
from rarefy.models.loader import load_model
from rarefy.models.safetensors_dir import SafetensorsCheckpoint, read_rarefy_metadata
from tests.conftest import make_random_checkpoint, write_tiny_tokenizer

LEGACY_CT = Path(os.environ.get("RAREFY_CT_LEGACY",
                                Path.home() / ".cache" / "rarefy" / "compressed-tensors-0.14.0.1"))


def _bits(t):
    """Integer view, so equality is bitwise (NaN == NaN, -0.0 != +0.0)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _sparse(shape, sparsity, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    return w


# -- encode / decode ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 9), (64, 33), (7, 128), (129, 257)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_round_trip_is_exact(dtype, shape, sparsity):
    seed = random.randrange(2**31)
    w = _sparse(shape, sparsity, dtype, seed)
    parts = encode_bitmask(w)
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == list(shape)
    assert parts["compressed"].dtype == dtype
    assert parts["compressed"].numel() == int((w != 0).sum())
    assert parts["bitmask"].dtype == torch.uint8
    assert tuple(parts["bitmask"].shape) == (shape[0], (shape[1] + 7) // 8)
    assert parts["row_offsets"].dtype == torch.int64
    out = decode_bitmask(parts)
    assert out.dtype == dtype and torch.equal(_bits(out), _bits(w)), f"seed {seed}"


def test_bit_order_and_offsets_by_hand():
    # row 0: columns 1 and 8 set -> bytes 0b10 (bit 1) and 0b1 (bit 0 of the 2nd byte)
    w = torch.zeros(3, 9)
    w[0, 1], w[0, 8], w[2, 0] = 2.0, 3.0, -1.0
    parts = encode_bitmask(w)
    assert parts["bitmask"].tolist() == [[2, 1], [0, 0], [1, 0]]
    assert parts["compressed"].tolist() == [2.0, 3.0, -1.0]
    assert parts["row_offsets"].tolist() == [0, 2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_edge_matrices(dtype):
    zero = torch.zeros(5, 11, dtype=dtype)
    parts = encode_bitmask(zero)
    assert parts["compressed"].numel() == 0 and parts["row_offsets"].tolist() == [0] * 5
    assert torch.equal(_bits(decode_bitmask(parts)), _bits(zero))
    dense = torch.randn(6, 10).to(dtype)
    dense[dense == 0] = 1  # no accidental zeros
    assert torch.equal(_bits(decode_bitmask(encode_bitmask(dense))), _bits(dense))
    rows = _sparse((9, 20), 0.5, dtype, 1)
    rows[[0, 4, 8]] = 0  # empty rows, first and last included
    assert torch.equal(_bits(decode_bitmask(encode_bitmask(rows))), _bits(rows))
    for one in (torch.zeros(1, 1, dtype=dtype), torch.full((1, 1), -3.5, dtype=dtype)):
        assert torch.equal(_bits(decode_bitmask(encode_bitmask(one))), _bits(one))


def test_special_values():
    w = torch.tensor([[float("nan"), 0.0, float("inf"), -0.0, -float("inf"), 1e-40]])
    out = decode_bitmask(encode_bitmask(w))
    assert torch.equal(_bits(out[:, [0, 2, 4, 5]]), _bits(w[:, [0, 2, 4, 5]]))  # kept exactly
    assert _bits(out)[0, 3] == 0  # -0.0 counts as zero (as in compressed-tensors): +0.0 back


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_bitmask(torch.ones(4))
    parts = encode_bitmask(_sparse((4, 12), 0.5, torch.float32, 2))
    for key, bad in [("compressed", parts["compressed"][:-1]), ("row_offsets", parts["row_offsets"] + 1),
                     ("shape", torch.tensor([4, 17])), ("bitmask", parts["bitmask"][:3])]:
        with pytest.raises(RarefyError, match="w.x"):
            decode_bitmask({**parts, key: bad}, name="w.x")
    with pytest.raises(RarefyError, match="row_offsets"):
        decode_bitmask({k: v for k, v in parts.items() if k != "row_offsets"})


# -- compressed-tensors (installed version, in process) -----------------------------------

def test_bit_packing_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.utils")
    w = _sparse((37, 45), 0.6, torch.float32, random.randrange(2**31))
    mask = w != 0
    parts = encode_bitmask(w)
    assert torch.equal(parts["bitmask"], ct.pack_bitmasks(mask))
    assert torch.equal(ct.unpack_bitmasks(parts["bitmask"], list(w.shape)), mask)
    assert torch.equal(pack_mask(mask), ct.pack_bitmasks(mask))


def test_config_entry_validates_with_compressed_tensors(pruned_dir):
    config = pytest.importorskip("compressed_tensors.config")
    qc = json.loads((pruned_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    sc = config.SparsityCompressionConfig.load_from_registry(qc["sparsity_config"]["format"],
                                                              **qc["sparsity_config"])
    assert type(sc).__name__ == "BitmaskConfig"
    assert sc.model_dump() == qc["sparsity_config"]  # every key, nothing of ours added


# -- save_pruned and loading back ---------------------------------------------------------

def _prune(model, sparsity=0.5, seed=0):
    """Zero a random `sparsity` of every projection weight (lm_head kept dense)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                p[torch.rand(p.shape, generator=g) < sparsity] = 0
    return model


META = {"method": "magnitude", "sparsity": 0.5, "component_sparsity": {"mlp": 0.5, "attn": 0.5},
        "calibration": None, "skip": ["lm_head"]}


@pytest.fixture(scope="module")
def pruned(tiny_model_dir):
    return _prune(load_model(str(tiny_model_dir), dtype="fp32").model, seed=random.randrange(2**31))


@pytest.fixture(scope="module")
def pruned_dir(pruned, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "out"
    save_pruned(pruned, out, source_path=tiny_model_dir, rarefy_meta=META, shard_size_bytes=100_000)
    return out


def test_round_trip_through_rarefy_loader(pruned, pruned_dir, tiny_model_dir):
    files = sorted(p.name for p in pruned_dir.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-00004.safetensors" in files
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(files)
    loaded = load_model(str(pruned_dir), dtype="fp32")
    ref, got = pruned.state_dict(), loaded.model.state_dict()
    assert list(ref) == list(got)
    for name in ref:
        assert torch.equal(_bits(ref[name]), _bits(got[name])), name
    ids = torch.tensor([[1, 17, 42, 99, 5, 250]])
    with torch.no_grad():
        assert torch.equal(pruned(ids), loaded.model(ids))
    src_tok = load_model(str(tiny_model_dir), dtype="fp32").tokenizer
    text = "The quick brown fox jumps."
    assert loaded.tokenizer.encode(text) == src_tok.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert loaded.tokenizer.apply_chat_template(msgs) == src_tok.apply_chat_template(msgs)


def test_checkpoint_contents(pruned, pruned_dir):
    ckpt = SafetensorsCheckpoint(pruned_dir)
    proj = [n for n in pruned.state_dict() if n.endswith("_proj.weight")]
    assert sorted(ckpt.tensor_names()) == sorted(pruned.state_dict())
    assert all(ckpt.is_compressed(n) for n in proj) and not ckpt.is_compressed("lm_head.weight")
    assert ckpt.tensor_dtype_name(proj[0]) == "F32"
    stored = json.loads((pruned_dir / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = proj[0][: -len(".weight")]
    assert {f"{prefix}.{s}" for s in ("shape", "compressed", "bitmask", "row_offsets")} <= set(stored)
    assert proj[0] not in stored
    cfg = json.loads((pruned_dir / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["ignore"] == ["lm_head"] and sc["targets"] == ["Linear"]
    meta = read_rarefy_metadata(pruned_dir)
    assert meta == cfg["rarefy"] and meta["method"] == "magnitude" and meta["format_version"] == 1
    assert abs(meta["measured"]["sparsity"] - 0.5) < 0.05 and set(meta["measured"]["per_component"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    import transformers
    hf = transformers.AutoConfig.from_pretrained(pruned_dir)  # still an ordinary HF config
    assert hf.model_type == "llama" and hf.num_hidden_layers == 2


def test_single_file_tied_bf16_and_custom_compress(tmp_path):
    src = tmp_path / "tied"
    make_random_checkpoint("llama_tied", src)
    write_tiny_tokenizer(src)
    loaded = load_model(str(src), dtype="fp32")
    model = _prune(loaded.model)
    out = tmp_path / "out"
    down = lambda n: n.endswith("down_proj.weight")  # noqa: E731
    save_pruned(model, out, source_path=src, dtype=torch.bfloat16, compress=down,
                tokenizer_files_from=loaded.tokenizer)  # a Tokenizer object, not files
    assert not (out / "model.safetensors.index.json").exists()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt"
    assert "lm_head.weight" not in keys  # tied: stored once, as the embedding
    assert "model.layers.0.mlp.down_proj.bitmask" in keys and "model.layers.0.mlp.up_proj.weight" in keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "model.layers.0.mlp.up_proj" in cfg["quantization_config"]["sparsity_config"]["ignore"]
    back = load_model(str(out), dtype="bf16")
    for name, t in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], t.to(torch.bfloat16)), name
    text, msgs = "Sparse models run fast.", [{"role": "user", "content": "hi"}]
    assert back.tokenizer.encode(text) == loaded.tokenizer.encode(text)
    assert back.tokenizer.apply_chat_template(msgs) == loaded.tokenizer.apply_chat_template(msgs)


def test_unpruned_model_is_saved_dense(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir), dtype="fp32").model
    save_pruned(model, tmp_path / "o", source_path=tiny_model_dir)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["rarefy"]["weights_format"] == "dense"
    assert read_rarefy_metadata(tiny_model_dir) is None


def test_refuses_the_input_and_non_empty_dirs(pruned, tiny_model_dir, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    for target in (tiny_model_dir, tiny_model_dir / "." / ".." / tiny_model_dir.name):
        with pytest.raises(RarefyError, match="input"):
            save_pruned(pruned, target, source_path=tiny_model_dir, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(RarefyError, match="not empty"):
        save_pruned(pruned, busy, source_path=tiny_model_dir)
    assert os.listdir(busy) == ["keep.txt"]
    save_pruned(pruned, busy, source_path=tiny_model_dir, overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "config.json").exists()
    # beside a GGUF file is fine, but never over the directory that holds it
    gdir = tmp_path / "g"
    gdir.mkdir()
    (gdir / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(RarefyError, match="contains the input"):
        save_pruned(pruned, gdir, source_path=gdir / "m.gguf", config_dict={}, overwrite=True)
    assert (gdir / "m.gguf").read_bytes() == b"GGUF"
    with pytest.raises(RarefyError, match="not a directory"):
        save_pruned(pruned, gdir / "m.gguf", config_dict={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "g"]  # no temp dirs left


def test_failure_mid_write_leaves_nothing(pruned, tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = checkpoint.save_file

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_pruned(pruned, tmp_path / "out", source_path=tiny_model_dir, shard_size_bytes=100_000)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
    # an existing (overwritable) output survives a failed replacement untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    calls.clear()
    with pytest.raises(RuntimeError):
        save_pruned(pruned, tmp_path / "out", source_path=tiny_model_dir, shard_size_bytes=100_000,
                    overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and os.listdir(tmp_path / "out") == ["old.txt"]


def test_loader_refuses_other_compressed_tensors_formats(pruned_dir, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(pruned_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["sparsity_config"]["format"] = "sparse-24-bitmask"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RarefyError, match="sparse-24-bitmask"):
        load_model(str(bad))


def test_file_sha256(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"abc")
    assert file_sha256(tmp_path / "c.txt") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# -- compressed-tensors' own compressor (0.14.0.1, the last release that has it) -----------

_LEGACY_SCRIPT = r"""
import json, sys
import compressed_tensors
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import BitmaskConfig
from safetensors.torch import load_file, save_file
ours, dense_in, ct_dir, dense_out = sys.argv[1:5]
# 1. decompress the directory rarefy wrote, reading its config.json like llm-compressor does
mc = ModelCompressor.from_pretrained(ours)
save_file(dict(mc.sparsity_compressor.decompress(ours)), dense_out)
# 2. compress a pruned dense state dict with the library and write config.json with it
state = load_file(dense_in)
targets = {n[: -len(".weight")] for n in state if n.endswith("_proj.weight")}
mc = ModelCompressor(sparsity_config=BitmaskConfig(targets=["Linear"], ignore=["lm_head"]))
save_file(mc.sparsity_compressor.compress(state, compression_targets=targets),
          ct_dir + "/model.safetensors", metadata={"format": "pt"})
mc.update_config(ct_dir)
print(compressed_tensors.__version__)
"""


def _legacy_python_path():
    try:
        import compressed_tensors.compressors.sparse_compressors  # noqa: F401  (<= 0.14 installed)
        return None
    except ImportError:
        pass
    if not (LEGACY_CT / "compressed_tensors" / "compressors" / "sparse_compressors").is_dir():
        pytest.skip("compressed-tensors >= 0.15 has no sparse-bitmask compressor; install 0.14.0.1 with "
                    f"`pip install --no-deps --target {LEGACY_CT} compressed-tensors==0.14.0.1`")
    return str(LEGACY_CT)


def test_compressed_tensors_compressor_both_directions(pruned, pruned_dir, tiny_model_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    legacy = _legacy_python_path()
    dense_in, dense_out, ct_dir = tmp_path / "in.safetensors", tmp_path / "out.safetensors", tmp_path / "ct"
    ct_dir.mkdir()
    state = pruned.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(dense_in))
    (ct_dir / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [legacy, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", _LEGACY_SCRIPT, str(pruned_dir), str(dense_in), str(ct_dir),
                        str(dense_out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # compressed-tensors decompresses rarefy's checkpoint to exactly the pruned tensors
    theirs = load_file(str(dense_out))
    assert set(theirs) == set(state)
    for name, t in state.items():
        assert torch.equal(_bits(theirs[name]), _bits(t)), name
    # rarefy reads compressed-tensors' checkpoint: same stored bytes, same dense tensors
    written = load_file(str(ct_dir / "model.safetensors"))
    for name in [n for n in state if n.endswith("_proj.weight")]:
        prefix = name[: -len(".weight")]
        ours = encode_bitmask(state[name])
        for part, t in ours.items():
            stored = written[f"{prefix}.{part}"]
            assert stored.dtype == t.dtype and torch.equal(stored, t), (name, part)
    back = load_model(str(ct_dir), dtype="fp32", with_tokenizer=False).model.state_dict()
    for name, t in state.items():
        assert torch.equal(_bits(back[name]), _bits(t)), name


# -- the embedded GGUF model ----------------------------------------------------------------

@pytest.mark.slow
def test_embedded_gguf_save_and_reload(embedded_model_path, tmp_path):
    src = load_model(None, dtype="fp32")
    model = src.model
    with torch.no_grad():  # 50%, cheaply (random masks are covered by the tests above)
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                p.view(-1)[1::2] = 0
    out = tmp_path / "smollm2-pruned"
    summary = save_pruned(model, out, source_path=embedded_model_path, rarefy_meta=META)
    assert summary["compressed"] and summary["bytes"] < summary["dense_bytes"]
    back = load_model(str(out), dtype="fp32")
    assert back.config == src.config
    ref, got = model.state_dict(), back.model.state_dict()
    assert all(torch.equal(ref[n], got[n]) for n in ref)
    ids = torch.tensor([src.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(model(ids), back.model(ids))
    for text in ("Hello, world!", "  spaces\tand\nnewlines ü 日本"):
        assert back.tokenizer.encode(text) == src.tokenizer.encode(text)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert back.tokenizer.apply_chat_template(msgs) == src.tokenizer.apply_chat_template(msgs)
    assert back.tokenizer.eos_token_ids == src.tokenizer.eos_token_ids
    assert back.tokenizer.add_bos == src.tokenizer.add_bos
    assert os.path.isfile(embedded_model_path)  # the source is untouched
