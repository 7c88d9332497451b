import torch

from rarefy.layers.half_weight_linear import HalfWeightLinear, use_half_weights
from rarefy.layers.linear import DenseLinear
from rarefy.models.loader import load_model
from tests.conftest import VOCAB


def _dense(n, k, bias):
    d = DenseLinear(k, n, bias)
    d.weight.data.normal_()
    if bias:
        d.bias.data.normal_()
    return d


def test_matches_fp16_rounded_reference_for_decode_and_prefill_rows():
    torch.manual_seed(0)
    for n, k, bias in [(33, 17, True), (130, 100, False), (7, 576, True)]:
        dense = _dense(n, k, bias)
        half = HalfWeightLinear.from_dense(dense)
        w = dense.weight.half().double()
        for rows in (1, 3, 8, 9, 40, 70):  # both sides of MAX_GEMV_ROWS
            x = torch.randn(2, rows, k) if rows % 2 == 0 else torch.randn(1, rows, k)
            want = x.double() @ w.t() + (dense.bias.double() if bias else 0)
            got = half(x)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.isfinite(got).all()
            assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_model_with_half_weights_tracks_fp32(random_checkpoint):
    kind, path, _ = random_checkpoint
    ref = load_model(path, dtype="fp32", with_tokenizer=False).model
    m = load_model(path, dtype="fp16w", with_tokenizer=False).model
    assert any(isinstance(x, HalfWeightLinear) for x in m.modules())
    assert not any(isinstance(x, DenseLinear) for x in m.modules())
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        want, got = ref(ids), m(ids)
        step = m(ids[:, :1])  # one row per sequence: the GEMV path
    assert ((got - want).norm() / want.norm()).item() < 5e-3, kind
    assert ((step[:, 0] - want[:, 0]).norm() / want[:, 0].norm()).item() < 5e-3, kind


def test_auto_dtype_on_cpu_uses_half_weights(random_checkpoint):
    _, path, _ = random_checkpoint
    m = load_model(path, with_tokenizer=False).model
    assert m.dtype == torch.float32
    assert sum(isinstance(x, HalfWeightLinear) for x in m.modules()) == 2 * 7 + 1


def test_use_half_weights_counts_every_projection():
    from rarefy.config import ModelConfig
    from rarefy.models.llama import DecoderLM
    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
    assert use_half_weights(DecoderLM(cfg)) == 3 * 7 + 1
