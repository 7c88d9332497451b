"""BitNet's published packed format (microsoft/bitnet-b1.58-2B-4T): read, load, repack."""

import json

import pytest
import torch
from typer.testing import CliRunner

from rarefy.cli import app
from rarefy.errors import RarefyError
from rarefy.layers.lowbit_linear import TernaryLinear
from rarefy.lowbit.bitnet_import import bitnet_multiplier, codes_equal, pack_bitnet, unpack_bitnet
from rarefy.lowbit.ternary import pack_ternary
from rarefy.models.loader import load_model
from tests.conftest import VOCAB, make_random_checkpoint
from tests.lowbit.conftest import write_bitnet_checkpoint


def test_unpack_matches_the_example_in_transformers_docs():
    # transformers/integrations/bitnet.py, unpack_weights' docstring: values are packed
    # along dim 0, row i*R + r in bits 2i..2i+1 of byte [r, c]
    packed = torch.tensor([[0b10100001, 0b00011000],
                           [0b10010000, 0b00001010]], dtype=torch.uint8)
    want = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert unpack_bitnet(packed).tolist() == want
    assert torch.equal(pack_bitnet(torch.tensor(want)), packed)


@pytest.mark.parametrize("out,cols", [(4, 1), (8, 3), (9, 5), (30, 7), (1, 4)])
def test_bitnet_pack_round_trip_and_repack_to_rarefy_layout(out, cols):
    v = torch.randint(-1, 2, (out, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(out))
    b = pack_bitnet(v)
    assert b.shape == ((out + 3) // 4, cols)
    assert torch.equal(unpack_bitnet(b, out), v)
    assert codes_equal(pack_ternary(v), b, cols, out)


def test_bad_packed_weights_and_scales():
    with pytest.raises(RarefyError, match="cannot hold"):
        unpack_bitnet(torch.zeros(2, 3, dtype=torch.uint8), 12)
    with pytest.raises(RarefyError, match="invalid"):
        unpack_bitnet(torch.full((1, 2), 0xFF, dtype=torch.uint8))
    assert bitnet_multiplier(torch.tensor([0.5]), "autobitlinear") == 0.5
    assert bitnet_multiplier(torch.tensor([0.5]), "bitlinear") == 2.0
    with pytest.raises(RarefyError):
        bitnet_multiplier(torch.tensor([0.0]), "autobitlinear")
    with pytest.raises(RarefyError):
        bitnet_multiplier(torch.tensor([1.0, 2.0]), "autobitlinear")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("bn_src")
    make_random_checkpoint("llama3", path)
    from tests.conftest import write_tiny_tokenizer
    write_tiny_tokenizer(path)
    return path


def _reference_logits(source, truth, ids):
    """The dense model with W = Q * s and int8 per-token activations, built by hand."""
    from rarefy.layers.lowbit_linear import fake_quant_int8_per_token
    m = load_model(source, dtype="fp32", with_tokenizer=False).model
    hooks = []
    for name, (q, s) in truth.items():
        mod = m.get_submodule(name)
        mod.weight.data = q.float() * s
        hooks.append(mod.register_forward_pre_hook(lambda mod, a: (fake_quant_int8_per_token(a[0]),)))
    with torch.no_grad():
        return m(ids)


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_load_bitnet_checkpoint(source, tmp_path, linear_class):
    truth = write_bitnet_checkpoint(source, tmp_path / "bn", linear_class)
    loaded = load_model(tmp_path / "bn", dtype="fp32")
    m = loaded.model
    layers = [x for x in m.modules() if isinstance(x, TernaryLinear)]
    assert len(layers) == 2 * 7 and all(x.act_quant == "int8" for x in layers)
    for name, (q, s) in truth.items():
        mod = m.get_submodule(name)
        assert torch.equal(mod.codes(), q)
        assert mod.weight_scale.item() == pytest.approx(s, rel=1e-6)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = m(ids)
    torch.testing.assert_close(got, _reference_logits(source, truth, ids), rtol=1e-4, atol=1e-4)
    assert loaded.tokenizer is not None


def test_online_mode_ternarizes_bf16_masters(source, tmp_path):
    write_bitnet_checkpoint(source, tmp_path / "bn", mode="online")
    m = load_model(tmp_path / "bn", dtype="fp32", with_tokenizer=False).model
    assert sum(isinstance(x, TernaryLinear) for x in m.modules()) == 14


def test_bitnet_architecture_is_refused_clearly(source, tmp_path):
    write_bitnet_checkpoint(source, tmp_path / "bn", model_type="bitnet")
    with pytest.raises(RarefyError, match="architecture"):
        load_model(tmp_path / "bn", with_tokenizer=False)


def test_quantize_repacks_losslessly_and_generate_runs(source, tmp_path):
    write_bitnet_checkpoint(source, tmp_path / "bn", "autobitlinear")
    r = CliRunner().invoke(app, ["quantize", "--model", str(tmp_path / "bn"), "--to", "ternary",
                                 "--out", str(tmp_path / "rq"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["kept"] == 14
    meta = json.loads((tmp_path / "rq" / "config.json").read_text())
    assert "quantization_config" not in meta
    assert all(s["act_quant"] == "int8" for s in meta["rarefy"]["lowbit"]["modules"].values())
    a = load_model(tmp_path / "bn", dtype="fp32", with_tokenizer=False).model
    b = load_model(tmp_path / "rq", dtype="fp32", with_tokenizer=False).model
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    for name, mod in a.named_modules():
        if isinstance(mod, TernaryLinear):
            assert torch.equal(mod.weight_ternary, b.get_submodule(name).weight_ternary)
    g = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "bn"), "-n", "4", "--ignore-eos",
                                 "--json", "The quick"])
    assert g.exit_code == 0, g.output


def test_transformers_reads_the_synthetic_checkpoint_the_same_way(source, tmp_path):
    """transformers' own BitNet integration (the reference for the published layout)
    gives the same logits as rarefy on the synthetic checkpoint."""
    tf = pytest.importorskip("transformers")
    write_bitnet_checkpoint(source, tmp_path / "bn", "bitlinear", scale_dtype=torch.float32)
    try:
        theirs = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bn"), dtype=torch.float32).eval()
    except Exception as e:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"transformers cannot load BitNet checkpoints here: {e}")
    ours = load_model(tmp_path / "bn", dtype="fp32", with_tokenizer=False).model
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
