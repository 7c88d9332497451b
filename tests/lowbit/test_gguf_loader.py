"""The loader's CPU default for GGUF files: projections kept as the file's blocks (GGUFLinear)."""

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.kernels import lowbit_cpu
from rarefy.kernels.lowbit_cpu.gguf_linear import GGUFLinear
from rarefy.layers.half_weight_linear import HalfWeightLinear
from rarefy.models.loader import load_model

pytestmark = pytest.mark.skipif(not lowbit_cpu.available(), reason="C++ CPU kernels unavailable")


@pytest.fixture(scope="module")
def fp32_model():
    return load_model(None, dtype="fp32", with_tokenizer=False).model


def _ids():
    return torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2682, 28, 9]])


def test_gguf_default_on_cpu_keeps_blocks(fp32_model):
    m = load_model(None, with_tokenizer=False).model
    layers = [x for x in m.modules() if isinstance(x, GGUFLinear)]
    assert len(layers) == 4 * m.config.num_layers + 1  # qkv, o, gate_up, down per layer; lm_head
    assert {x.qtype for x in layers} == {"Q4_1", "Q8_0"}
    assert isinstance(m.lm_head, GGUFLinear) and m.lm_head.qtype == "Q8_0"
    assert not any(p.is_meta for p in m.parameters())
    assert not any(isinstance(x, HalfWeightLinear) for x in m.modules())
    with torch.inference_mode():
        got, want = m(_ids()), fp32_model(_ids())
    # 16-bit fixed-point activations against fp32 products of the same (dequantized) weights
    assert ((got - want).norm() / want.norm()).item() < 1e-3
    assert torch.equal(got[0].argmax(-1), want[0].argmax(-1))


@pytest.mark.parametrize("kw", [{"gguf_blocks": False}, {"dtype": "fp16w"}])
def test_old_dense_path_on_request(kw):
    m = load_model(None, with_tokenizer=False, **kw).model
    assert not any(isinstance(x, GGUFLinear) for x in m.modules())
    assert sum(isinstance(x, HalfWeightLinear) for x in m.modules()) == 7 * m.config.num_layers + 1


def test_gguf_blocks_not_the_default_for_explicit_dtypes_or_hf_dirs(random_checkpoint):
    m = load_model(None, dtype="fp32", with_tokenizer=False).model
    assert not any(isinstance(x, GGUFLinear) for x in m.modules())
    _, path, _ = random_checkpoint
    m = load_model(path, with_tokenizer=False).model  # an HF directory: fp16w as before
    assert not any(isinstance(x, GGUFLinear) for x in m.modules())
    m = load_model(path, with_tokenizer=False, gguf_blocks=True).model  # not a GGUF file: nothing to keep
    assert not any(isinstance(x, GGUFLinear) for x in m.modules())


def test_gguf_blocks_refused_on_cuda():
    from rarefy.models.loader import wants_gguf_blocks
    with pytest.raises(RarefyError, match="CPU only"):
        wants_gguf_blocks(True, "gguf", "auto", torch.device("cuda"), "off")
    assert not wants_gguf_blocks(None, "gguf", "auto", torch.device("cuda"), "off")
