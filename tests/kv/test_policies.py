"""Sparse-attention policies: masks on hand-checkable cases, window eviction safety (exhaustive
on small sizes), parsing, config files and errors."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.kv.policies import (
    Dense,
    Entropy,
    PolicyConfig,
    Threshold,
    TopK,
    Window,
    load_policy_config,
    parse_policy,
    policy_config_from_dict,
    resolve_policy_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


INF = float("-inf")


def _kept(masked: torch.Tensor) -> list:
    """Indices of finite entries of each row of a [1, 1, Tq, Tk] tensor."""
    return [torch.isfinite(r).nonzero().flatten().tolist() for r in masked[0, 0]]


def _row(values, q_pos):
    """One query row over keys at positions 0..len-1 → (scores [1,1,1,Tk], q_pos [1], k_pos [Tk])."""
    s = torch.tensor(values, dtype=torch.float32)[None, None, None]
    return s, torch.tensor([q_pos]), torch.arange(len(values))


def test_dense_is_causal_only():
    s = torch.zeros(1, 1, 4, 4)
    pos = torch.arange(4)
    assert _kept(Dense().apply(s, pos, pos)) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]


def test_topk_absolute_and_fraction():
    s, qp, kp = _row([3.0, 1.0, 4.0, 1.5, 5.0, 9.0], 4)  # key 5 is in the future: never kept
    assert _kept(TopK(k=2).apply(s, qp, kp)) == [[2, 4]]
    assert _kept(TopK(k=100).apply(s, qp, kp)) == [[0, 1, 2, 3, 4]]
    assert _kept(TopK(frac=0.4).apply(s, qp, kp)) == [[2, 4]]  # ceil(0.4 * 5 visible) = 2
    assert _kept(TopK(frac=0.5).apply(s, qp, kp)) == [[0, 2, 4]]  # ceil(2.5) = 3
    assert _kept(TopK(frac=0.01).apply(s, qp, kp)) == [[4]]  # at least one key
    # per query: the fraction is of the keys each query sees
    sq = torch.tensor([[5.0, 0, 0, 0], [1, 2, 0, 0], [1, 3, 2, 0], [4, 3, 2, 1]])[None, None]
    pos = torch.arange(4)
    assert _kept(TopK(frac=0.5).apply(sq, pos, pos)) == [[0], [1], [1, 2], [0, 1]]
    # padding (-inf) entries are never counted or revived
    s2 = torch.tensor([1.0, INF, 2.0, 0.5])[None, None, None]
    assert _kept(TopK(k=3).apply(s2, torch.tensor([3]), torch.arange(4))) == [[0, 2, 3]]


def test_threshold_drops_small_weights_and_renormalises():
    p = [0.5, 0.3, 0.15, 0.05]
    s, qp, kp = _row([math.log(x) for x in p], 3)
    out = Threshold(t=0.1).apply(s, qp, kp)
    assert _kept(out) == [[0, 1, 2]]
    w = torch.softmax(out, -1)[0, 0, 0]
    assert torch.allclose(w[:3], torch.tensor(p[:3]) / 0.95, atol=1e-6) and w[3] == 0
    assert _kept(Threshold(t=0.9).apply(s, qp, kp)) == [[0]]  # the top key always stays
    assert _kept(Threshold(t=0.0).apply(s, qp, kp)) == [[0, 1, 2, 3]]


def test_entropy_picks_k_from_the_effective_number_of_keys():
    # two dominant keys: exp(H) ≈ 2 → k = factor · 2
    s, qp, kp = _row([0.0, 0.0] + [-30.0 - i for i in range(8)], 9)
    assert _kept(Entropy(factor=1, k_min=1).apply(s, qp, kp)) == [[0, 1]]
    assert len(_kept(Entropy(factor=2, k_min=1).apply(s, qp, kp))[0]) == 4
    assert len(_kept(Entropy(factor=1, k_min=6).apply(s, qp, kp))[0]) == 6
    # a uniform head keeps everything it sees
    s, qp, kp = _row([0.0] * 10, 6)
    assert _kept(Entropy(factor=1, k_min=1).apply(s, qp, kp)) == [list(range(7))]


def test_window_hand_case():
    s = torch.zeros(1, 1, 10, 10)
    pos = torch.arange(10)
    # block 2, one sink token (→ block 0), window 3 tokens
    kept = _kept(Window(sinks=1, window=3, stride=0, block_size=2).apply(s, pos, pos))
    assert kept[9] == [0, 1, 6, 7, 8, 9]  # window [7, 9] touches blocks 3, 4
    assert kept[6] == [0, 1, 4, 5, 6]  # window [4, 6] → blocks 2, 3 (token 7 is in the future)
    assert kept[2] == [0, 1, 2]
    kept = _kept(Window(sinks=1, window=3, stride=2, block_size=2).apply(s, pos, pos))
    assert kept[9] == [0, 1, 4, 5, 6, 7, 8, 9]  # + block 2 (stride)
    kept = _kept(Window(sinks=0, window=1, stride=0, block_size=4).apply(s, pos, pos))
    assert kept[9] == [8, 9] and kept[7] == [4, 5, 6, 7]  # the query's own block


def _blocks_read(policy: Window, p: int, bs: int) -> set[int]:
    s = torch.zeros(1, 1, 1, p + 1)
    kept = _kept(policy.apply(s, torch.tensor([p]), torch.arange(p + 1)))[0]
    return {j // bs for j in kept}


def test_window_eviction_is_safe_and_exact_exhaustive():
    """For every small configuration and cache length n: kept_blocks(n) is exactly what the
    newest query (position n-1) reads, contains every block any later query reads, and a
    block once dropped is never kept again."""
    horizon = 19
    for bs, sinks, window, stride in itertools.product((1, 2, 3, 4), (0, 1, 5), (1, 2, 5, 9), (0, 1, 3)):
        pol = Window(sinks=sinks, window=window, stride=stride, block_size=bs)
        reads = {p: _blocks_read(pol, p, bs) for p in range(horizon)}
        prev = None
        peak = 0
        for n in range(1, horizon):
            kept = pol.kept_blocks(n, bs)
            assert kept == sorted(set(kept)), (pol, n)
            existing = -(-n // bs)
            assert set(kept) == reads[n - 1], (pol, n)
            for p in range(n - 1, horizon):  # no future query reads an evicted block
                assert {b for b in reads[p] if b < existing} <= set(kept), (pol, n, p)
            if prev is not None:
                assert set(kept) & set(range(-(-(n - 1) // bs))) <= prev, (pol, n)
            prev = set(kept)
            peak = max(peak, len(kept))
        assert pol.memory_fraction(horizon - 1, bs) == pytest.approx(peak / -(-(horizon - 1) // bs))


def test_window_memory_fraction_at_2048():
    assert Window(16, 496, 0, 16).memory_fraction(2048, 16) == pytest.approx(33 / 128)  # 1 sink + ≤ 32 window
    assert Window(16, 481, 0, 16).memory_fraction(2048, 16) == pytest.approx(0.25)
    assert len(Window(16, 496, 0, 16).kept_blocks(2048, 16)) == 32
    assert TopK(k=4).memory_fraction(2048, 16) == 1.0 and not TopK(k=4).evicts
    assert TopK(k=4).kept_blocks(33, 16) == [0, 1, 2]
    with pytest.raises(RarefyError, match="block=32"):
        Window(block_size=16).kept_blocks(100, 32)


def test_parse_round_trip_and_defaults():
    for spec in ("dense", "topk:k=256", "topk:frac=0.25", "threshold:t=0.001",
                 "window:sinks=4,window=512,stride=0,block=16", "entropy:factor=1.5,min=8"):
        p = parse_policy(spec)
        assert p.spec == spec and parse_policy(p.spec) == p
    assert parse_policy("window:sinks=16, window=496") == Window(16, 496, 0, 16)
    assert parse_policy(" TopK:k=3 ") == TopK(k=3)
    assert parse_policy("entropy") == Entropy()
    assert parse_policy("window:stride=4").stride == 4


@pytest.mark.parametrize("spec, message", [
    ("foo", "unknown attention policy"), ("", "empty"), ("topk", "exactly one"),
    ("topk:k=0", "at least 1"), ("topk:k=3,frac=0.5", "exactly one"), ("topk:frac=1.5", r"\(0, 1\]"),
    ("topk:k=2.5", "an integer"), ("threshold:t=x", "a number"), ("threshold:t=1", r"\[0, 1\)"),
    ("window:window=0", "≥ 1"), ("window:sinks=-1", "≥ 0"), ("window:bogus=1", "unknown option"),
    ("topk:k", "key=value"), ("dense:k=1", "options: none"), ("window:sinks=1,sinks=2", "twice"),
    ("entropy:factor=0", "> 0"), ("threshold:t=nan", "finite"),
])
def test_parse_errors(spec, message):
    with pytest.raises(RarefyError, match=message):
        parse_policy(spec)


def test_config_files(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('default = "window:sinks=16,window=496"\n[layers]\n"0-1" = "dense"\n"5" = "topk:k=64"\n')
    cfg = load_policy_config(str(toml))
    assert cfg.for_layer(0) == Dense() and cfg.for_layer(1) == Dense() and cfg.for_layer(5) == TopK(k=64)
    assert cfg.for_layer(2) == Window(16, 496, 0, 16) and cfg.evicts
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"default": "topk:frac=0.25", "layers": {"3": "dense"}}))
    cfg2 = resolve_policy_config(str(js))
    assert cfg2.for_layer(3) == Dense() and cfg2.for_layer(0) == TopK(frac=0.25) and not cfg2.evicts
    assert resolve_policy_config("threshold:t=0.01").for_layer(7) == Threshold(0.01)
    assert resolve_policy_config(None).for_layer(0) == Dense()
    assert cfg.with_block_size(32).for_layer(2).block_size == 32
    cfg.check(30)
    with pytest.raises(RarefyError, match="has 4 layers"):
        PolicyConfig(Dense(), {5: Dense()}).check(4)


@pytest.mark.parametrize("content, message", [
    ('default = "dense"\nbogus = 1\n', "unknown key"),
    ('default = "topk:k=0"\n', "at least 1"),
    ('[layers]\n"a" = "dense"\n', "not an index"),
    ('[layers]\n"3-1" = "dense"\n', "bad layer range"),
    ('[layers]\n"0-2" = "dense"\n"1" = "topk:k=2"\n', "more than one policy"),
    ('default = \n', "cannot parse"),
])
def test_config_errors(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(RarefyError, match=message):
        load_policy_config(str(path))


def test_config_missing_file_and_bad_dict(tmp_path):
    with pytest.raises(RarefyError, match="not found"):
        load_policy_config(str(tmp_path / "nope.toml"))
    with pytest.raises(RarefyError, match="not found"):
        resolve_policy_config(str(tmp_path / "nope.json"))
    with pytest.raises(RarefyError, match="'layers' must map"):
        policy_config_from_dict({"layers": ["dense"]})


@pytest.mark.parametrize("spec", ["dense", "topk:k=3", "topk:frac=0.3", "threshold:t=0.05", "entropy:factor=1,min=2",
                                  "window:sinks=2,window=3,stride=2,block=2"])
def test_apply_leaves_input_alone_and_keep_mask_agrees(spec):
    pol = parse_policy(spec)
    s = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    before = s.clone()
    pos = torch.arange(9)
    out = pol.apply(s, pos, pos)
    assert torch.equal(s, before)
    assert torch.equal(pol.apply(s.clone(), pos, pos, inplace=True), out)
    if pol.score_independent:
        assert torch.equal(pol.keep_mask(pos, pos).expand_as(out), torch.isfinite(out))
