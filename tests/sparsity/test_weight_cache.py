"""Tests for the CPU differential weight cache (rarefy.sparsity.weight_cache) and its sparse MLP.

After any sequence of masks the pool must hold exactly the active neurons' weights in slot
order, never more than capacity, and the MLP through it must equal the dense MLP with the
inactive neurons zeroed (float64 reference on the stored weight values).
"""

from __future__ import annotations

import math

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.kernels import weight_cache_cpu
from rarefy.kernels.weight_cache_cpu import sparse_mlp, sparse_mlp_ref, sparse_mlp_rows_ref
from rarefy.sparsity.weight_cache import DifferentialWeightCache, index_select_rows


@pytest.fixture(scope="module", autouse=True)
def built():
    assert weight_cache_cpu.warm_up(), f"weight cache extension unavailable: {weight_cache_cpu._state['error']}"


def _weights(h, i, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(i, h, generator=g) / h**0.5, torch.randn(i, h, generator=g) / h**0.5,
            torch.randn(h, i, generator=g) / i**0.5)


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_cache(c: DifferentialWeightCache, mask: torch.Tensor):
    """Pool == index_select of the sources in slot order; maps consistent; bound respected."""
    n = int(mask.sum())
    assert c.n_active == n <= c.capacity
    ids = c.active_neurons()
    assert ids.numel() == n
    assert torch.equal(torch.sort(ids).values, mask.nonzero().squeeze(1))
    slot = c.slot_of()
    assert torch.equal(slot[ids], torch.arange(n))
    assert (slot[~mask] == -1).all()
    assert torch.equal(c.mask, mask)
    assert torch.equal(c.gate_rows(), c.src_gate.index_select(0, ids))
    assert torch.equal(c.up_rows(), c.src_up.index_select(0, ids))
    assert torch.equal(c.down_t_rows(), c.src_down_t.index_select(0, ids))


def _random_mask(gen, i, k):
    m = torch.zeros(i, dtype=torch.bool)
    m[torch.randperm(i, generator=gen)[:k]] = True
    return m


def _sequence(gen, i, cap, steps):
    """Random masks with the edge cases mixed in: empty, at capacity, repeats, alternation."""
    masks = []
    prev = _random_mask(gen, i, cap // 2)
    for t in range(steps):
        kind = t % 7
        if kind == 0:
            m = torch.zeros(i, dtype=torch.bool)                       # empty
        elif kind == 1:
            m = _random_mask(gen, i, cap)                               # full at capacity
        elif kind == 2:
            m = prev.clone()                                            # identical to the last
        elif kind == 3:                                                 # overlapping random walk
            m = prev.clone()
            on = m.nonzero().squeeze(1)
            off = (~m).nonzero().squeeze(1)
            drop = on[torch.randperm(on.numel(), generator=gen)[:max(1, on.numel() // 4)]] if on.numel() else on
            m[drop] = False
            room = cap - int(m.sum())
            add = off[torch.randperm(off.numel(), generator=gen)[:torch.randint(0, room + 1, (1,), generator=gen).item()]]
            m[add] = True
        else:                                                           # any size up to capacity
            m = _random_mask(gen, i, int(torch.randint(0, cap + 1, (1,), generator=gen)))
        masks.append(m)
        prev = m
    a, b = _random_mask(gen, i, cap), _random_mask(gen, i, cap // 3)
    masks += [a, b, a, b, a]                                            # alternating
    return masks


@pytest.mark.parametrize("h,i,frac", [(13, 37, 0.5), (100, 70, 1.0), (33, 129, 0.3), (576, 150, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("interleave", [True, False])
def test_random_sequences_hold_exact_weights(h, i, frac, dtype, interleave):
    gate, up, down = _weights(h, i, seed=h + i)
    c = DifferentialWeightCache(gate, up, down, frac, dtype=dtype, interleave=interleave)
    assert c.capacity == math.ceil(frac * i)
    gen = torch.Generator().manual_seed(i)
    tol = 1e-5
    for step, m in enumerate(_sequence(gen, i, c.capacity, 30)):
        assert c.update(m) == int(m.sum())
        _check_cache(c, m)
        x = torch.randn(h, generator=gen)
        y = c.mlp(x)
        ref = sparse_mlp_ref(x, c.src_gate, c.src_up, c.src_down_t.t(), m)
        if m.any():
            assert _rel(y, ref) < tol, (step, _rel(y, ref))
        else:
            assert torch.equal(y, torch.zeros(h))


def test_matches_dense_mlp_with_fp16_tolerance():
    """Against the dense fp32 MLP (original weights) with inactive neurons zeroed: fp16 rounding only."""
    gate, up, down = _weights(77, 200, seed=3)
    c = DifferentialWeightCache(gate, up, down, 0.6)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        m = _random_mask(gen, 200, 100)
        x = torch.randn(3, 77, generator=gen)
        c.update(m)
        y = c.mlp(x)
        assert y.shape == (3, 77)
        assert _rel(y, sparse_mlp_ref(x, gate, up, down, m)) < 5e-3
        for r in range(3):   # batch rows equal the single-row results
            assert _rel(c.mlp(x[r]), sparse_mlp_ref(x[r], gate, up, down, m)) < 5e-3


def test_scalar_and_avx_paths_and_threads():
    gate, up, down = _weights(45, 90, seed=5)
    idx = torch.randperm(90)[:61]
    g, u, d = gate[idx].half(), up[idx].half(), down.t()[idx].contiguous().half()
    x = torch.randn(45)
    for n in (0, 1, 3, 4, 5, 61):
        ref = sparse_mlp_rows_ref(x, g, u, d, n)
        for isa in range(weight_cache_cpu.best_isa() + 1):
            y = sparse_mlp(x, g, u, d, n, isa=isa)
            if n == 0:
                assert torch.equal(y, torch.zeros(45))
            else:
                assert _rel(y, ref) < 1e-5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = sparse_mlp(x, g, u, d)
    finally:
        torch.set_num_threads(threads)
    assert _rel(y1, sparse_mlp_rows_ref(x, g, u, d, 61)) < 1e-5


def test_large_model_shape_and_interleave_layouts_agree():
    gate, up, down = _weights(576, 1536, seed=7)
    a = DifferentialWeightCache(gate, up, down, 0.5, interleave=True)
    b = DifferentialWeightCache(gate, up, down, 0.5, interleave=False)
    gen = torch.Generator().manual_seed(2)
    m = _random_mask(gen, 1536, 700)
    for step in range(4):
        a.update(m), b.update(m)
        _check_cache(a, m), _check_cache(b, m)
        x = torch.randn(576, generator=gen)
        ya, yb = a.mlp(x), b.mlp(x)
        assert torch.equal(ya, yb)
        assert _rel(ya, sparse_mlp_ref(x, a.src_gate, a.src_up, a.src_down_t.t(), m)) < 1e-5
        m = m.clone()
        on, off = m.nonzero().squeeze(1), (~m).nonzero().squeeze(1)
        m[on[torch.randperm(on.numel(), generator=gen)[:150]]] = False
        m[off[torch.randperm(off.numel(), generator=gen)[:100 + 40 * step]]] = True


def test_index_select_baseline_agrees():
    gate, up, down = _weights(40, 64, seed=9)
    c = DifferentialWeightCache(gate, up, down, 0.5)
    m = _random_mask(torch.Generator().manual_seed(0), 64, 20)
    c.update(m)
    idx, g, u, d = index_select_rows(c.src_gate, c.src_up, c.src_down_t, m)
    assert torch.equal(idx, m.nonzero().squeeze(1))
    x = torch.randn(40)
    assert _rel(sparse_mlp(x, g, u, d), sparse_mlp_ref(x, c.src_gate, c.src_up, c.src_down_t.t(), m)) < 1e-5
    assert _rel(c.mlp(x), sparse_mlp_rows_ref(x, g, u, d, 20)) < 1e-5


def test_only_changed_neurons_move():
    """Paired replacement: unchanged neurons keep their slots when the count does not shrink."""
    gate, up, down = _weights(16, 32)
    c = DifferentialWeightCache(gate, up, down, 0.5)
    m = torch.zeros(32, dtype=torch.bool)
    m[:10] = True
    c.update(m)
    before = c.slot_of().clone()
    m2 = m.clone()
    m2[[2, 5]] = False
    m2[[20, 21, 22]] = True
    c.update(m2)
    after = c.slot_of()
    kept = m & m2
    assert torch.equal(after[kept], before[kept])
    assert sorted(after[[20, 21]].tolist()) == sorted(before[[2, 5]].tolist())  # freed slots reused
    assert after[22].item() == 10                                               # then appended
    _check_cache(c, m2)


def test_over_capacity():
    gate, up, down = _weights(8, 20)
    c = DifferentialWeightCache(gate, up, down, 0.25)      # capacity 5
    assert c.capacity == 5
    m = torch.zeros(20, dtype=torch.bool)
    m[:3] = True
    c.update(m)
    big = torch.zeros(20, dtype=torch.bool)
    big[:8] = True
    with pytest.raises(RarefyError, match="capacity 5"):
        c.update(big)
    _check_cache(c, m)                                      # unchanged after the error
    scores = torch.arange(20, dtype=torch.float32)
    assert c.update(big, scores) == 5                       # keeps the top 5 scores: 3..7
    keep = torch.zeros(20, dtype=torch.bool)
    keep[3:8] = True
    _check_cache(c, keep)
    scores[4] = float("nan")                                # NaN ranks last
    assert c.update(big, scores) == 5
    keep[4], keep[2] = False, True
    _check_cache(c, keep)


def test_fraction_one_and_tiny():
    gate, up, down = _weights(8, 7)
    assert DifferentialWeightCache(gate, up, down, 1.0).capacity == 7
    assert DifferentialWeightCache(gate, up, down, 1e-6).capacity == 1
    assert DifferentialWeightCache(gate, up, down, 0.5).capacity == 4
    assert DifferentialWeightCache(*_weights(576, 1536), 0.5).capacity == 768


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.01, float("nan"), "0.5", None, True])
def test_bad_fraction(frac):
    with pytest.raises(RarefyError, match="max_active_fraction"):
        DifferentialWeightCache(*_weights(8, 16), frac)


def test_bad_construction():
    gate, up, down = _weights(8, 16)
    with pytest.raises(RarefyError, match="up must"):
        DifferentialWeightCache(gate, up[:, :4], down, 0.5)
    with pytest.raises(RarefyError, match="down must"):
        DifferentialWeightCache(gate, up, down.t(), 0.5)
    with pytest.raises(RarefyError, match="dtype"):
        DifferentialWeightCache(gate, up, down, 0.5, dtype=torch.bfloat16)
    with pytest.raises(RarefyError, match="2-D"):
        DifferentialWeightCache(gate[0], up, down, 0.5)
    c = DifferentialWeightCache(gate, up, down.t().contiguous(), 0.5, down_transposed=True)
    assert torch.equal(c.src_down_t, down.t().half())


def test_bad_masks():
    gate, up, down = _weights(8, 16)
    c = DifferentialWeightCache(gate, up, down, 0.5)
    good = torch.zeros(16, dtype=torch.bool)
    good[:4] = True
    c.update(good)
    bad = [
        (good.to(torch.uint8), "bool"),
        (good.float(), "bool"),
        (torch.zeros(15, dtype=torch.bool), "shape"),
        (torch.zeros(1, 16, dtype=torch.bool), "shape"),
        (torch.zeros(32, dtype=torch.bool)[::2], "contiguous"),
    ]
    for m, what in bad:
        with pytest.raises(RarefyError, match=what):
            c.update(m)
    with pytest.raises(RarefyError):
        c.update([True] * 16)
    big = torch.ones(16, dtype=torch.bool)
    with pytest.raises(RarefyError, match="scores"):
        c.update(big, torch.zeros(16, dtype=torch.float64))
    with pytest.raises(RarefyError, match="scores"):
        c.update(big, torch.zeros(15))
    _check_cache(c, good)                                   # nothing changed by the failures
    with pytest.raises(RarefyError, match="float32"):
        c.mlp(torch.zeros(8, dtype=torch.float64))
    with pytest.raises(RarefyError):
        c.mlp(torch.zeros(9))


def test_reset_and_from_mlp():
    from rarefy.config import ModelConfig  # noqa: F401  (MLP needs only the two sizes)
    from rarefy.layers.mlp import MLP

    class Cfg:
        hidden_size, intermediate_size = 24, 40

    mlp = MLP(Cfg())
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    c = DifferentialWeightCache.from_mlp(mlp, 1.0, dtype=torch.float32)
    x = torch.randn(24)
    c.update(torch.ones(40, dtype=torch.bool))
    with torch.no_grad():
        assert _rel(c.mlp(x), mlp(x).double()) < 1e-5
    c.reset()
    assert c.n_active == 0 and not c.mask.any()
    m = torch.zeros(40, dtype=torch.bool)
    m[::3] = True
    c.update(m)
    _check_cache(c, m)
    mlp.fuse_projections()  # stacked gate/up: the same cache
    c2 = DifferentialWeightCache.from_mlp(mlp, 1.0, dtype=torch.float32)
    c2.update(m)
    _check_cache(c2, m)
    assert _rel(c2.mlp(x), c.mlp(x).double()) < 1e-6


def test_bool_view_with_nonzero_bytes():
    """A bool view of bytes other than 0/1 (e.g. uint8.view(bool)) counts nonzero as active."""
    gate, up, down = _weights(8, 21)
    c = DifferentialWeightCache(gate, up, down, 1.0)
    raw = torch.zeros(21, dtype=torch.uint8)
    raw[[0, 3, 9, 20]] = torch.tensor([2, 255, 1, 16], dtype=torch.uint8)
    assert c.update(raw.view(torch.bool)) == 4
    _check_cache(c, raw != 0)
    raw[3] = 0
    raw[5] = 128
    assert c.update(raw.view(torch.bool)) == 4
    _check_cache(c, raw != 0)
