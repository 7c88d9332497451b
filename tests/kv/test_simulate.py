"""Simulated (evaluation) attention: matches SDPA for bf16/dense, quantized error bounds,
evaluation == decode for every policy, and the hooks on a tiny random model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rarefy.config import ModelConfig
from rarefy.errors import RarefyError
from rarefy.kv.policies import Dense, PolicyConfig, Window, parse_policy
from rarefy.kv.quant import roundtrip
from rarefy.kv.simulate import (
    attention_read_fraction,
    clear_eval_attention,
    configure_eval_attention,
    decode_attention_with_policy,
    eval_attention,
    simulated_attention,
)
from rarefy.models.llama import DecoderLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")


POLICIES = ["dense", "topk:k=5", "topk:frac=0.3", "threshold:t=0.02", "entropy:factor=1.5,min=2",
            "window:sinks=3,window=6,stride=0,block=4", "window:sinks=1,window=5,stride=2,block=4"]


def _qkv(B=2, Hq=6, Hkv=2, T=37, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g) * 1.5 for h in (Hq, Hkv, Hkv))
    return q, k, v, torch.arange(T)


def test_bf16_dense_matches_sdpa():
    q, k, v, pos = _qkv()
    kb, vb = roundtrip(k, "bf16"), roundtrip(v, "bf16")
    ref = F.scaled_dot_product_attention(q, kb, vb, is_causal=True, enable_gqa=True)
    for chunk in (512, 5):
        out = simulated_attention(q, k, v, pos, "bf16", None, q_chunk=chunk)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    # against unrounded float32 keys: only bf16's rounding of k and v separates them
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (out - full).abs().max() < 0.05


@pytest.mark.parametrize("name, rel", [("fp16", 1e-3), ("bf16", 8e-3), ("int8", 0.015), ("fp8_e4m3", 0.07),
                                       ("fp8_e5m2", 0.13)])
def test_quantized_attention_error_within_bounds(name, rel):
    q, k, v, pos = _qkv(T=64, D=64, seed=1)
    x = k.float()
    err = (roundtrip(x, name) - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    if name == "int8":  # half a step of amax/127 (the float16 scale rounding adds ≤ 2^-11 relative)
        assert (err <= amax / 127 * 0.5 * (1 + 2 ** -10) + 1e-7).all()
    elif name.startswith("fp8"):  # half an ulp: 2^-4 (e4m3) or 2^-3 (e5m2) of |x|, for normal values
        half_ulp = 2.0 ** -4 if name == "fp8_e4m3" else 2.0 ** -3
        normal = x.abs() >= amax * 2.0 ** -5
        assert (err[normal] <= x.abs()[normal] * half_ulp * 1.001).all()
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = simulated_attention(q, k, v, pos, name)
    rel_err = ((out - exact).norm() / exact.norm()).item()
    assert rel_err < rel, rel_err


@pytest.mark.parametrize("spec", POLICIES)
def test_eval_equals_decode(spec):
    """Row p of the evaluation output == one decode step for the query at p over keys 0..p
    (padded to a common length, rows of different lengths in one batch)."""
    policy = parse_policy(spec)
    q, k, v, pos = _qkv(T=21)
    kq = roundtrip(k, "int8")
    vq = roundtrip(v, "int8")
    full = simulated_attention(q, k, v, pos, "int8", policy)
    T = q.shape[2]
    for p in range(T):
        lens = torch.tensor([p + 1, max(1, p - 3)])
        qd = torch.stack([q[0, :, p], q[1, :, lens[1] - 1]])
        out = decode_attention_with_policy(qd, kq, vq, lens, policy)
        torch.testing.assert_close(out[0], full[0, :, p], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], full[1, :, lens[1] - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", POLICIES[-2:])
def test_window_eval_equals_dense_decode_over_kept_blocks(spec):
    """What the paged cache does: evict to kept_blocks, then dense attention over the rest."""
    policy = parse_policy(spec)
    bs = policy.block_size
    q, k, v, pos = _qkv(B=1, T=33)
    full = simulated_attention(q, k, v, pos, "bf16", policy)
    kb, vb = roundtrip(k, "bf16"), roundtrip(v, "bf16")
    for p in range(q.shape[2]):
        idx = torch.tensor([j for b in policy.kept_blocks(p + 1, bs) for j in range(b * bs, (b + 1) * bs) if j <= p])
        n = torch.tensor([len(idx)])
        dense = decode_attention_with_policy(q[:, :, p], kb[:, :, idx], vb[:, :, idx], n, Dense())
        torch.testing.assert_close(dense[0], full[0, :, p], atol=1e-5, rtol=1e-5)
        # and the window policy itself, given the kept keys' true positions, keeps them all
        same = decode_attention_with_policy(q[:, :, p], kb[:, :, idx], vb[:, :, idx], n, policy,
                                            q_pos=torch.tensor([p]), k_pos=idx[None])
        torch.testing.assert_close(same, dense, atol=1e-6, rtol=1e-6)


def _model(layers=3, seed=0):
    cfg = ModelConfig(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=160,
                      num_layers=layers, num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(seed)
    m = DecoderLM(cfg)
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    m.rotary.build(torch.device("cpu"))
    return m.eval()


def _ids(T=64, B=2):
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def test_model_hooks_bf16_dense_match_normal_forward():
    m = _model()
    ids = _ids()
    ref = m(ids)
    with eval_attention(m, "bf16", None):
        out = m(ids)
    assert (out - ref).abs().max() < 2e-2 * ref.abs().max()
    assert all(layer.self_attn.eval_attention is None for layer in m.model.layers)
    mb = _model().to(torch.bfloat16)  # bf16 model: the bf16 cache stores keys exactly
    ref = mb(ids).float()
    configure_eval_attention(mb, "bf16", "dense")
    out = mb(ids).float()
    clear_eval_attention(mb)
    assert (out - ref).abs().max() < 3e-2 * ref.abs().max()


@torch.no_grad()
def test_policies_on_tiny_model_finite():
    m = _model()
    ids = _ids()
    dense = m(ids)
    for kv, spec in [(kv, "dense") for kv in ("fp16", "fp8_e4m3", "fp8_e5m2")] + [("int8", p) for p in POLICIES]:
        with eval_attention(m, kv, spec, track_reads=True):
            out = m(ids)
            frac = attention_read_fraction(m)
        assert torch.isfinite(out).all(), (kv, spec)
        assert 0 < frac <= 1
        if spec == "dense":
            assert frac == 1
    # a window covering the whole context is dense
    with eval_attention(m, "bf16", "window:sinks=0,window=256"):
        wide = m(ids)
    with eval_attention(m, "bf16", "dense"):
        assert torch.allclose(wide, m(ids))
    assert not torch.allclose(wide, dense)  # bf16 rounding of k/v is visible


@torch.no_grad()
def test_per_layer_config_and_errors(tmp_path):
    m = _model()
    path = tmp_path / "p.toml"
    path.write_text('default = "window:sinks=4,window=8,block=4"\n[layers]\n"0" = "dense"\n')
    cfg = configure_eval_attention(m, "fp16", str(path))
    hooks = [layer.self_attn.eval_attention for layer in m.model.layers]
    assert hooks[0].policy == Dense() and hooks[1].policy == Window(4, 8, 0, 4) and hooks[2].kv_dtype == "fp16"
    assert cfg.evicts
    assert torch.isfinite(m(_ids())).all()
    clear_eval_attention(m)
    with pytest.raises(RarefyError, match="has 3 layers"):
        configure_eval_attention(m, "bf16", PolicyConfig(Dense(), {3: Dense()}))
    with pytest.raises(RarefyError, match="unknown KV-cache dtype"):
        configure_eval_attention(m, "int4", None)
    with pytest.raises(RarefyError, match="unknown attention policy"):
        configure_eval_attention(m, "bf16", "sliding:w=3")
    assert all(layer.self_attn.eval_attention is None for layer in m.model.layers)


def test_query_subset_and_read_counts():
    q, k, v, pos = _qkv(T=40)
    full = simulated_attention(q, k, v, pos, "fp8_e4m3", "topk:frac=0.5")
    part = simulated_attention(q[:, :, 25:], k, v, pos, "fp8_e4m3", "topk:frac=0.5", q_positions=pos[25:])
    torch.testing.assert_close(part, full[:, :, 25:], atol=1e-6, rtol=1e-6)
    stats = {"from_pos": 30}
    simulated_attention(q, k, v, pos, "bf16", "topk:k=4", stats=stats, q_chunk=7)
    assert stats["visible"] == 2 * 6 * sum(p + 1 for p in range(30, 40))
    assert stats["kept"] == 2 * 6 * 10 * 4
    with pytest.raises(ValueError, match="q_positions"):
        simulated_attention(q[:, :, 25:], k, v, pos)
