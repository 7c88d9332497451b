"""use_activation_sparsity: the model through the input-sparse kernels equals the
threshold hooks (dense compute on zeroed inputs), for fused and unfused projections."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rarefy.config import ModelConfig  # noqa: E402
from rarefy.errors import RarefyError  # noqa: E402
from rarefy.layers.activation_sparse import (  # noqa: E402
    ActivationSparseLinear,
    ActivationSparseMLP,
    use_activation_sparsity,
)
from rarefy.layers.half_weight_linear import use_half_weights  # noqa: E402
from rarefy.models.llama import DecoderLM  # noqa: E402
from rarefy.sparsity.activation import calibrate_thresholds, sparsify_activations  # noqa: E402


def _model(bias=False, seed=0):
    cfg = ModelConfig(model_type="qwen2" if bias else "llama", vocab_size=97, hidden_size=48,
                      intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
                      attention_bias=bias)
    torch.manual_seed(seed)
    m = DecoderLM(cfg)
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    m.rotary.build(torch.device("cpu"))
    return m.eval()


@pytest.mark.parametrize("bias,fuse", [(False, False), (True, True)])
@pytest.mark.parametrize("max_rows", [10**6, 0])  # every call sparse / every call dense (prefill)
def test_model_matches_hook_reference(bias, fuse, max_rows):
    model = _model(bias)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    th = calibrate_thresholds(model, torch.randint(0, 97, (600,)).tolist(), [0.4], seq_len=64, samples=4)
    t = th.for_sparsity(0.4)
    with torch.no_grad():
        with sparsify_activations(model, t):
            ref = model(ids)
        dense = model(ids)
        if fuse:
            for layer in model.model.layers:
                layer.self_attn.fuse_projections()
                layer.mlp.fuse_projections()
        use_activation_sparsity(model, t, max_rows=max_rows)
        assert isinstance(model.model.layers[0].mlp, ActivationSparseMLP)
        assert isinstance(model.model.layers[1].self_attn.o_proj, ActivationSparseLinear)
        out = model(ids)
    want = ref if max_rows else dense  # prefill stays dense unless asked
    assert torch.isfinite(out).all()
    assert torch.allclose(out, want, atol=2e-4, rtol=1e-4), (out - want).abs().max()


def test_half_weights_and_sparse_prefill():
    model = _model()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    t = calibrate_thresholds(model, torch.randint(0, 97, (600,)).tolist(), [0.5], seq_len=64,
                             samples=4).for_sparsity(0.5)
    use_half_weights(model)
    with torch.no_grad():
        with sparsify_activations(model, t):
            ref = model(ids)
        use_activation_sparsity(model, t, max_rows=0, sparse_prefill=True)
        assert model.model.layers[0].mlp.gate_up_t.dtype == torch.float16
        out = model(ids)
    assert torch.allclose(out, ref, atol=2e-3, rtol=1e-3), (out - ref).abs().max()


def test_missing_thresholds():
    model = _model()
    with pytest.raises(RarefyError, match="lack"):
        use_activation_sparsity(model, {"0.attn_in": 0.1})


def _weighted_rule(model, s):
    th = calibrate_thresholds(model, torch.randint(0, 97, (600,), generator=torch.Generator().manual_seed(3)).tolist(),
                              [s], seq_len=64, samples=4, criterion="weighted")
    return th.rule(s)


@pytest.mark.parametrize("bias,fuse", [(False, False), (True, True)])
def test_weighted_criterion_folding_is_exact_in_fp32(bias, fuse):
    """Folding c into the norms / up_proj / o_proj's input and 1/c into the weights leaves the
    dense model unchanged up to fp32 rounding; the folded kernels equal the weighted hooks."""
    model = _model(bias)
    assert model.config.num_heads != model.config.num_kv_heads  # grouped-query attention
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    rule = _weighted_rule(model, 0.4)
    with torch.no_grad():
        dense = model(ids)
        with sparsify_activations(model, rule) as counts:
            ref = model(ids)
        if fuse:
            model.fuse_projections()
        norm_before = model.model.layers[0].input_layernorm.weight.clone()
        use_activation_sparsity(model, rule, max_rows=0)  # every call dense: the folded weights alone
        assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)  # folded
        assert model.model.layers[0].self_attn.o_proj.in_scale is not None
        folded_dense = model(ids)
        for layer in model.model.layers:  # now every call through the sparse kernels
            for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp):
                m.max_rows = 10**6
        out = model(ids)
    rel = float((folded_dense - dense).norm() / dense.norm())
    assert rel < 2e-6, rel  # fp32 rounding only
    assert sum(z for z, _ in counts.values()) > 0
    assert torch.allclose(out, ref, atol=2e-4, rtol=1e-4), (out - ref).abs().max()


def test_explicit_scales_with_sparse_prefill_equal_the_hooks():
    """Thresholds plus explicit scales (the folding API without a rule), sparse prefill."""
    from rarefy.sparsity.activation_criteria import input_scales

    model = _model()
    rule = _weighted_rule(model, 0.5)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with sparsify_activations(model, rule):
            ref = model(ids)
        scales = input_scales(model, "weighted")
        use_activation_sparsity(model, rule.params, scales=scales, sparse_prefill=True, max_rows=0)
        out = model(ids)  # prefill path, same thresholds on the folded inputs
    assert torch.allclose(out, ref, atol=2e-4, rtol=1e-4), (out - ref).abs().max()


def test_weighted_bad_input():
    model = _model()
    rule = _weighted_rule(model, 0.4)
    with pytest.raises(RarefyError, match="scales lack"):
        use_activation_sparsity(model, rule.params, scales={"0.attn_in": torch.ones(48)})
    from rarefy.sparsity.activation import LevelRule
    with pytest.raises(RarefyError, match="take thresholds; this calibration is in topk mode"):
        use_activation_sparsity(model, LevelRule("topk", rule.params, "weighted"))
    with pytest.raises(RarefyError, match="in_scale must have shape"):
        ActivationSparseLinear(torch.zeros(8, 4), None, 0.1, in_scale=torch.ones(5))
