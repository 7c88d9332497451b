"""Tests for the low-bit CPU kernels (rarefy.kernels.lowbit_cpu) and GGUF block helpers
(rarefy.formats.gguf_blocks).

Every kernel result is compared element by element with a float64 reference computed on the
activations as the kernel quantizes them (ref.py mirrors that quantization with the same fp32
operations), within an fp32 summation bound ``(K/16 + 16) * 2^-24 * (|x_hat| @ |W|^T + |bias|)``;
and with the exact float64 product within the documented activation-quantization bound. Every
code path this CPU has (portable, AVX2, AVX-512) is forced in turn. The extension builds once
per machine (cached by torch; ~15-25 s cold on this 2-core machine).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.formats import gguf_blocks as gb
from rarefy.kernels import lowbit_cpu as lb
from rarefy.kernels.lowbit_cpu import gguf_gemv_cpu, int8_gemv_cpu, ternary_gemv_cpu
from rarefy.kernels.lowbit_cpu.ref import act_error_bound, act_fixed16, act_int8, act_q8_blocks
from rarefy.lowbit.int8 import quantize_int8
from rarefy.lowbit.ternary import dequantize_ternary, pack_ternary

ACTS = [None, "int8"]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert lb.warm_up(), f"lowbit_cpu extension unavailable: {lb._state['error']}"
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)


def _isas():
    return list(range(lb.best_isa() + 1))


def _close(y, ref, bound, k, what=""):
    """|y - ref| <= (k/16 + 16) 2^-24 bound, NaN exactly where ref is NaN."""
    assert y.dtype == torch.float32 and y.shape == ref.shape, (y.shape, ref.shape)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan), f"{what}: NaN pattern differs"
    tol = (k / 16 + 16) * 2.0**-24 * bound + 1e-30
    err = (y.double() - ref).abs()
    ok = (err <= tol) | nan
    assert ok.all(), f"{what}: max err {err[~nan].max().item():.3g}, worst ratio {(err / tol)[~nan].max().item():.3g}"


def _xhat(x, act):
    return act_int8(x) if act == "int8" else act_fixed16(x)


def _ternary(n, k, g, gen, scale_dtype=torch.float32, special=False):
    v = torch.randint(-1, 2, (n, k), generator=gen)
    if special and n >= 4:
        v[0] = 0
        v[1] = 1
        v[2] = -1
        v[3, ::2] = 1
        v[3, 1::2] = -1
    packed = pack_ternary(v)
    scale = (torch.rand(1, 1, generator=gen) + 0.1) if g is None else (torch.rand(n, k // g, generator=gen) + 0.1)
    return packed, scale.to(scale_dtype)


def _ternary_bound(x, packed, scale, g, act, bias):
    w = dequantize_ternary(packed, scale.float(), x.shape[1], g, torch.float64)
    b = _xhat(x, act).abs().nan_to_num(0) @ w.abs().t()
    return b + bias.double().abs() if bias is not None else b


# --------------------------------------------------------------------------- ternary

TERNARY_CASES = [  # (M, N, K, group)
    (1, 7, 4, None), (3, 33, 100, None), (16, 9, 576, None), (1, 1, 1536, None), (3, 5, 4096, None),
    (1, 7, 99, None), (3, 5, 7, None),                       # K not a multiple of 4: padded last byte
    (1, 33, 64, 16), (16, 7, 576, 32), (3, 9, 576, 64), (1, 5, 1536, 192), (3, 3, 4096, 128),
    (2, 5, 512, 256), (1, 3, 2048, 1024), (16, 3, 4096, 4096),   # lane and segment modes
    (3, 7, 96, 4), (1, 5, 120, 8), (2, 3, 576, 12),          # not multiples of 16: portable path
    (1, 37, 576, 576), (3, 9, 1540, 1540), (2, 5, 100, 100),  # one group per row (fuse_lowbit): segment
]


@pytest.mark.parametrize("act", ACTS)
def test_ternary_matches_reference(act):
    gen = torch.Generator().manual_seed(1)
    for i, (m, n, k, g) in enumerate(TERNARY_CASES):
        packed, scale = _ternary(n, k, g, gen, torch.float16 if i % 3 == 2 else torch.float32, special=i % 2 == 0)
        x = torch.randn(m, k, generator=gen) * (10.0 ** (i % 5 - 2))
        bias = torch.randn(n, generator=gen) if i % 2 else None
        ref = lb.ternary_gemv_ref(x, packed, scale, g, act_quant=act, bias=bias)
        bound = _ternary_bound(x, packed, scale, g, act, bias)
        for isa in _isas():
            y = ternary_gemv_cpu(x, packed, scale, g, act_quant=act, bias=bias, isa=isa)
            _close(y, ref, bound, k, f"ternary {m}x{n}x{k} g={g} act={act} isa={isa}")


@pytest.mark.parametrize("act", ACTS)
def test_ternary_activation_error_bound(act):
    """Against the exact float64 product: |y - x @ W^T| <= bound(x) * sum|W| (+ fp32 error)."""
    gen = torch.Generator().manual_seed(2)
    for m, n, k, g in [(3, 17, 576, None), (16, 5, 1536, 64), (1, 9, 4096, None)]:
        packed, scale = _ternary(n, k, g, gen)
        x = torch.randn(m, k, generator=gen)
        x[0, 3] = 40.0  # an outlier sets amax
        y = ternary_gemv_cpu(x, packed, scale, g, act_quant=act)
        exact = lb.ternary_gemv_ref(x, packed, scale, g, exact=True)
        w = dequantize_ternary(packed, scale.float(), k, g, torch.float64)
        tol = act_error_bound(x, act) * w.abs().sum(1) + 1e-5 * (x.double().abs() @ w.abs().t())
        assert ((y.double() - exact).abs() <= tol).all()


def test_int8_mode_is_fake_quant_int8_per_token():
    """act_quant="int8" quantizes exactly as the layers' reference (fake_quant_int8_per_token)."""
    from rarefy.layers.lowbit_linear import fake_quant_int8_per_token

    gen = torch.Generator().manual_seed(15)
    x = torch.randn(64, 1000, generator=gen) * torch.rand(64, 1, generator=gen) * 10
    assert torch.equal(act_int8(x).float(), fake_quant_int8_per_token(x))
    # the kernel's quantized activations: an identity int8 weight returns them, q * (1/s) instead
    # of q / s (one fp32 rounding apart); a different q would be off by >= 1/127 relative
    eye = torch.eye(1000, dtype=torch.int8)
    for isa in _isas():
        y = int8_gemv_cpu(x, eye, torch.ones(1000, 1), act_quant="int8", isa=isa)
        torch.testing.assert_close(y, fake_quant_int8_per_token(x), rtol=2.5e-7, atol=0)


def test_ternary_special_inputs():
    """All-zero / all-±1 rows of W, all-zero and constant rows of x, tiny and huge x."""
    n, k = 6, 576
    v = torch.zeros(n, k, dtype=torch.int64)
    v[1], v[2] = 1, -1
    v[3, ::3] = 1
    packed = pack_ternary(v)
    scale = torch.tensor([[0.5]])
    x = torch.stack([torch.zeros(k), torch.ones(k), torch.full((k,), -3.0), torch.randn(k) * 1e-30,
                     torch.randn(k) * 1e30])
    for act in ACTS:
        ref = lb.ternary_gemv_ref(x, packed, scale, act_quant=act)
        for isa in _isas():
            y = ternary_gemv_cpu(x, packed, scale, act_quant=act, isa=isa)
            _close(y, ref, _ternary_bound(x, packed, scale, None, act, None), k, f"special act={act} isa={isa}")
            assert (y[0] == 0).all() and (y[:, 0] == 0).all()
            assert torch.allclose(y[1, 1:3].double(), torch.tensor([288.0, -288.0], dtype=torch.float64))


def test_ternary_nan_never_passes():
    gen = torch.Generator().manual_seed(3)
    packed, scale = _ternary(9, 300, None, gen)
    x = torch.randn(4, 300, generator=gen)
    x[1, 17] = float("nan")
    x[2, 299] = float("inf")
    for act in ACTS:
        for isa in _isas():
            y = ternary_gemv_cpu(x, packed, scale, act_quant=act, isa=isa)
            assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
            assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
    # a NaN scale poisons exactly the rows that use it
    packed, scale = _ternary(5, 256, 64, gen)
    scale[2, 1] = float("nan")
    for isa in _isas():
        y = ternary_gemv_cpu(torch.randn(2, 256, generator=gen), packed, scale, 64, isa=isa)
        assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, [0, 1, 3, 4]]).all()


# --------------------------------------------------------------------------- int8

INT8_CASES = [  # (M, N, K, group)
    (1, 7, 1, None), (3, 33, 100, None), (16, 9, 576, None), (1, 3, 4096, None), (3, 5, 61, None),
    (1, 17, 64, 4), (16, 7, 576, 32), (3, 9, 576, 64), (1, 5, 1536, 96), (2, 3, 4096, 512),
    (3, 5, 90, 6), (1, 3, 63, 7),                                # not multiples of 4: portable path
    (2, 5, 90, 90), (1, 9, 576, 576),                            # one group per row: segment mode
]


@pytest.mark.parametrize("act", ACTS)
def test_int8_matches_reference(act):
    gen = torch.Generator().manual_seed(4)
    for i, (m, n, k, g) in enumerate(INT8_CASES):
        w = torch.randn(n, k, generator=gen)
        if n >= 3:
            w[0] = 0
            w[1] = w[1].abs().max()   # a row of the largest value: all codes 127
        iw = quantize_int8(w, g, torch.float16 if i % 3 == 2 else torch.float32)
        x = torch.randn(m, k, generator=gen) * (10.0 ** (i % 5 - 2))
        bias = torch.randn(n, generator=gen) if i % 2 else None
        ref = lb.int8_gemv_ref(x, iw.qweight, iw.scale, g, act_quant=act, bias=bias)
        wd = iw.dequantize(torch.float64)
        bound = _xhat(x, act).abs() @ wd.abs().t() + (bias.double().abs() if bias is not None else 0)
        for isa in _isas():
            y = int8_gemv_cpu(x, iw.qweight, iw.scale, g, act_quant=act, bias=bias, isa=isa)
            _close(y, ref, bound, k, f"int8 {m}x{n}x{k} g={g} act={act} isa={isa}")


def test_int8_extreme_codes_and_error_bound():
    """Codes ±127 (and -128, never written but representable) everywhere; exact-product bound."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-128, 128, (7, 576), generator=gen, dtype=torch.int8)
    q[0], q[1], q[2] = 127, -127, -128
    scale = torch.rand(7, 1, generator=gen) + 0.1
    x = torch.randn(3, 576, generator=gen)
    for act in ACTS:
        ref = lb.int8_gemv_ref(x, q, scale, act_quant=act)
        bound = _xhat(x, act).abs() @ (q.double().abs() * scale.double()).t()
        for isa in _isas():
            _close(int8_gemv_cpu(x, q, scale, act_quant=act, isa=isa), ref, bound, 576, f"int8 extremes isa={isa}")
        exact = x.double() @ (q.double() * scale.double()).t()
        tol = act_error_bound(x, act) * (q.double().abs() * scale.double()).sum(1) + 1e-5 * bound
        assert ((int8_gemv_cpu(x, q, scale, act_quant=act).double() - exact).abs() <= tol).all()


def test_int8_nan_never_passes():
    gen = torch.Generator().manual_seed(6)
    iw = quantize_int8(torch.randn(5, 128, generator=gen), 32)
    x = torch.randn(3, 128, generator=gen)
    x[1, 0] = float("-inf")
    for isa in _isas():
        y = int8_gemv_cpu(x, iw.qweight, iw.scale, 32, isa=isa)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# --------------------------------------------------------------------------- GGUF blocks

def _random_blocks(qtype, n, k, gen):
    """Arbitrary bytes (every nibble / int8 pattern) with finite fp16 scales of either sign."""
    bt = gb.QTYPES[qtype]
    raw = torch.randint(0, 256, (n * k // 32, bt.nbytes), generator=gen, dtype=torch.uint8)
    heads = (torch.randn(n * k // 32, bt.header // 2, generator=gen) * 0.05).half()
    raw[:, :bt.header] = heads.view(torch.uint8).reshape(-1, bt.header)
    return raw.reshape(-1).contiguous()


GGUF_CASES = [(1, 7, 32), (3, 5, 96), (16, 3, 128), (1, 9, 160), (3, 33, 576), (16, 5, 1536), (2, 1, 4096)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("qtype", list(gb.QTYPES))
def test_gguf_matches_reference(qtype, act):
    gen = torch.Generator().manual_seed(7)
    for i, (m, n, k) in enumerate(GGUF_CASES):
        blocks = gb.quantize(torch.randn(n, k, generator=gen), qtype) if i % 2 else _random_blocks(qtype, n, k, gen)
        x = torch.randn(m, k, generator=gen) * (10.0 ** (i % 5 - 2))
        if i == 2:
            x[1] = 0.0
            x[2, :32] = 0.0  # an all-zero activation block
        bias = torch.randn(n, generator=gen) if i % 2 else None
        ref = lb.gguf_gemv_ref(x, blocks, qtype, (n, k), act_quant=act, bias=bias)
        w = gb.dequantize(blocks, qtype, (n, k), torch.float64)
        bound = act_q8_blocks(x, act).abs() @ w.abs().t() + (bias.double().abs() if bias is not None else 0)
        for isa in _isas():
            y = gguf_gemv_cpu(x, blocks, qtype, (n, k), act_quant=act, bias=bias, isa=isa)
            _close(y, ref, bound, k, f"{qtype} {m}x{n}x{k} act={act} isa={isa}")
        # activation quantization per block of 32: error <= amax_b/254 (int8), amax_b/64516 (16-bit)
        exact = x.double() @ w.t() + (bias.double() if bias is not None else 0)
        amax = x.double().abs().reshape(m, k // 32, 32).amax(-1, keepdim=True).expand(m, k // 32, 32).reshape(m, k)
        per = amax / 254 * (1 + 1e-6) if act == "int8" else amax / 64516 * (1 + 1e-3) + amax * 2.0**-23
        tol = per @ w.abs().t() + 1e-5 * bound
        y = gguf_gemv_cpu(x, blocks, qtype, (n, k), act_quant=act, bias=bias)
        assert ((y.double() - exact).abs() <= tol).all()


def test_gguf_nan_never_passes():
    gen = torch.Generator().manual_seed(8)
    for qtype in gb.QTYPES:
        blocks = gb.quantize(torch.randn(3, 96, generator=gen), qtype)
        x = torch.randn(3, 96, generator=gen)
        x[0, 40] = float("nan")
        for isa, act in itertools.product(_isas(), ACTS):
            y = gguf_gemv_cpu(x, blocks, qtype, (3, 96), act_quant=act, isa=isa)
            assert torch.isnan(y[0]).all() and torch.isfinite(y[1:]).all()
        nanblk = blocks.clone().view(3, -1)
        nanblk[1, :2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # fp16 NaN as row 1's first d
        for isa in _isas():
            y = gguf_gemv_cpu(torch.randn(2, 96, generator=gen), nanblk.reshape(-1), qtype, (3, 96), isa=isa)
            assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()


def test_gguf_blocks_match_gguf_py():
    """dequantize == gguf-py's, bit for bit; quantize == gguf-py's quantizer (llama.cpp's reference)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    gen = torch.Generator().manual_seed(9)
    for qtype in gb.QTYPES:
        qt = GGMLQuantizationType[qtype]
        assert gb.QTYPES[qtype].ggml_type == int(qt)
        w = torch.randn(6, 160, generator=gen)
        w[0, :32] = 0.0  # d = 0 block
        mine = gb.quantize(w, qtype)
        theirs = quantize(w.numpy(), qt)
        assert np.array_equal(mine.numpy(), theirs.reshape(-1)), qtype
        raw = _random_blocks(qtype, 6, 160, gen)
        ref = dequantize(raw.numpy().reshape(6, -1), qt)
        got = gb.dequantize(raw, qtype, (6, 160))
        assert np.array_equal(got.numpy(), ref), qtype


def test_gguf_row_permutation_is_lossless():
    from rarefy.models.gguf_file import _undo_rope_permute

    gen = torch.Generator().manual_seed(10)
    for qtype in gb.QTYPES:
        n, k, heads = 24, 64, 3
        blocks = _random_blocks(qtype, n, k, gen)
        dense = gb.dequantize(blocks, qtype, (n, k))
        moved = gb.undo_rope_permute(blocks, qtype, (n, k), heads)
        assert torch.equal(gb.dequantize(moved, qtype, (n, k)), torch.from_numpy(_undo_rope_permute(dense.numpy(), heads)))
        perm = torch.randperm(n, generator=gen)
        assert torch.equal(gb.dequantize(gb.permute_rows(blocks, qtype, (n, k), perm), qtype, (n, k)), dense[perm])
    with pytest.raises(RarefyError):
        gb.permute_rows(blocks, "Q8_0", (n, k), torch.zeros(n, dtype=torch.long))
    with pytest.raises(RarefyError):
        gb.undo_rope_permute(blocks, "Q8_0", (n, k), 5)


def test_embedded_model_tensors():
    """A Q4_1 projection and the Q8_0 embedding of the embedded GGUF, read from the file."""
    gguf = pytest.importorskip("gguf")
    from rarefy.models.default_model import default_model_path

    reader = gguf.GGUFReader(default_model_path())
    by_type = {}
    for t in reader.tensors:
        if t.tensor_type.name in gb.QTYPES and len(t.shape) == 2:
            by_type.setdefault(t.tensor_type.name, t)
    assert "Q4_1" in by_type
    gen = torch.Generator().manual_seed(11)
    for qtype, t in by_type.items():
        blocks, qt, (n, k) = gb.from_reader_tensor(t)
        assert qt == qtype
        from gguf.quants import dequantize
        assert torch.equal(gb.dequantize(blocks, qt, (n, k)), torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(n, k))
        if n > 4096:  # the 49152-row embedding: a slice of rows is enough
            n = 1024
            blocks = blocks[: n * gb.row_nbytes(qt, k)].contiguous()
        x = torch.randn(3, k, generator=gen)
        w = gb.dequantize(blocks, qt, (n, k), torch.float64)
        for act in ACTS:
            ref = lb.gguf_gemv_ref(x, blocks, qt, (n, k), act_quant=act)
            _close(gguf_gemv_cpu(x, blocks, qt, (n, k), act_quant=act), ref, act_q8_blocks(x, act).abs() @ w.abs().t(),
                   k, t.name)


# --------------------------------------------------------------------------- shared behaviour

def test_results_do_not_depend_on_threads_and_leading_dims():
    gen = torch.Generator().manual_seed(12)
    packed, scale = _ternary(301, 576, 64, gen)
    iw = quantize_int8(torch.randn(301, 576, generator=gen))
    blocks = gb.quantize(torch.randn(301, 576, generator=gen), "Q4_1")
    x = torch.randn(2, 3, 576, generator=gen)
    calls = [lambda xx: ternary_gemv_cpu(xx, packed, scale, 64), lambda xx: int8_gemv_cpu(xx, iw.qweight, iw.scale),
             lambda xx: gguf_gemv_cpu(xx, blocks, "Q4_1", (301, 576))]
    for f in calls:
        torch.set_num_threads(1)
        one = f(x)
        torch.set_num_threads(2)
        two = f(x)
        assert one.shape == (2, 3, 301) and torch.equal(one, two)
        assert torch.equal(f(x.reshape(6, 576)), one.reshape(6, 301))
        xt = x.reshape(6, 576).t().contiguous().t()  # non-contiguous view
        assert torch.equal(f(xt), one.reshape(6, 301))
        assert torch.equal(f(x[0, 0]), one[0, 0])
        assert f(torch.zeros(0, 576)).shape == (0, 301)


def test_isa_names_and_forcing():
    assert lb.best_isa() in lb.ISA_NAMES
    packed, scale = _ternary(4, 64, None, torch.Generator().manual_seed(0))
    with pytest.raises(RarefyError, match="not available"):
        ternary_gemv_cpu(torch.randn(1, 64), packed, scale, isa=lb.best_isa() + 1)


def test_bad_arguments_raise_rarefy_error():
    gen = torch.Generator().manual_seed(13)
    packed, scale = _ternary(8, 64, None, gen)
    gpacked, gscale = _ternary(8, 64, 16, gen)
    x = torch.randn(2, 64, generator=gen)
    iw = quantize_int8(torch.randn(8, 64, generator=gen), 16)
    blocks = gb.quantize(torch.randn(8, 64, generator=gen), "Q4_0")
    bad = [
        (lambda: ternary_gemv_cpu(x.double(), packed, scale), "float32"),
        (lambda: ternary_gemv_cpu(x.half(), packed, scale), "float32"),
        (lambda: ternary_gemv_cpu(x, packed.to(torch.int8), scale), "uint8"),
        (lambda: ternary_gemv_cpu(x[:, :60], packed, scale), "bytes per row"),
        (lambda: ternary_gemv_cpu(x, packed, scale, 16), "shape"),
        (lambda: ternary_gemv_cpu(x, gpacked, gscale, 24), "divide"),
        (lambda: ternary_gemv_cpu(x, gpacked, gscale, 0), "positive"),
        (lambda: ternary_gemv_cpu(x, gpacked, gscale, 2), "multiple of 4"),
        (lambda: ternary_gemv_cpu(x, gpacked, gscale.double(), 16), "float32 or float16"),
        (lambda: ternary_gemv_cpu(x, packed, scale, act_quant="int4"), "act_quant"),
        (lambda: ternary_gemv_cpu(x, packed, scale, bias=torch.randn(7)), "bias"),
        (lambda: ternary_gemv_cpu(x, packed.t().contiguous().t(), scale), "contiguous"),
        (lambda: ternary_gemv_cpu(torch.tensor(1.0), packed, scale), "scalar"),
        (lambda: int8_gemv_cpu(x, iw.qweight.view(torch.uint8), iw.scale, 16), "int8"),
        (lambda: int8_gemv_cpu(x, iw.qweight, iw.scale, None), "shape"),
        (lambda: int8_gemv_cpu(x, iw.qweight, iw.scale, 12), "divide"),
        (lambda: int8_gemv_cpu(x[:, :32], iw.qweight, iw.scale, 16), "columns"),
        (lambda: gguf_gemv_cpu(x, blocks, "Q4_2", (8, 64)), "unsupported"),
        (lambda: gguf_gemv_cpu(x, blocks, "Q4_0", (8, 48)), "multiple of 32"),
        (lambda: gguf_gemv_cpu(x, blocks, "Q4_0", (9, 64)), "bytes"),
        (lambda: gguf_gemv_cpu(x, blocks, "Q4_0", (8,)), "shape"),
        (lambda: gguf_gemv_cpu(x, blocks[:-1], "Q4_0", (8, 64)), "bytes"),
        (lambda: gguf_gemv_cpu(x, blocks.view(torch.int8), "Q4_0", (8, 64)), "uint8"),
        (lambda: gguf_gemv_cpu(x[:, :32], blocks, "Q4_0", (8, 64)), "columns"),
        (lambda: gguf_gemv_cpu(x, blocks, "Q4_0", (8, 64), isa=7), "not available"),
        (lambda: gguf_gemv_cpu(x, blocks, "Q4_0", (8, 64), act_quant="q8"), "act_quant"),
    ]
    for i, (call, words) in enumerate(bad):
        with pytest.raises(RarefyError, match=words):
            call()


def test_gguf_linear_swaps_layers_of_the_embedded_model():
    """use_gguf_blocks on modules named like the model's: q_proj (rope rows un-interleaved),
    down_proj and the tied lm_head run on the file's blocks and match the dequantized weights."""
    pytest.importorskip("gguf")
    from torch import nn

    from rarefy.kernels.lowbit_cpu.gguf_linear import GGUFLinear, use_gguf_blocks
    from rarefy.layers.linear import DenseLinear
    from rarefy.models.default_model import default_model_path
    from rarefy.models.gguf_file import GGUFCheckpoint

    ckpt = GGUFCheckpoint(default_model_path())
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Module()])
    layer = model.model.layers[0]
    layer.self_attn, layer.mlp = nn.Module(), nn.Module()
    layer.self_attn.q_proj = DenseLinear(576, 576)
    layer.mlp.down_proj = DenseLinear(1536, 576)
    model.lm_head = DenseLinear(576, 49152)
    assert use_gguf_blocks(model, ckpt) == 3
    gen = torch.Generator().manual_seed(14)
    for mod, name in [(layer.self_attn.q_proj, "model.layers.0.self_attn.q_proj.weight"),
                      (layer.mlp.down_proj, "model.layers.0.mlp.down_proj.weight"),
                      (model.lm_head, "model.embed_tokens.weight")]:
        assert isinstance(mod, GGUFLinear)
        w = ckpt.load(name)  # dequantized, rope rows undone
        assert torch.equal(mod.dequantized_weight(), w)
        x = torch.randn(2, 1, mod.in_features, generator=gen)
        xh = act_q8_blocks(x.reshape(2, -1), None)
        _close(mod(x).reshape(2, -1), xh @ w.double().t(), xh.abs() @ w.double().abs().t(), mod.in_features, name)
        xs = torch.randn(70, mod.in_features, generator=gen)  # past MAX_KERNEL_ROWS: dense fallback
        torch.testing.assert_close(mod(xs), xs @ w.t(), rtol=1e-4, atol=1e-4)
        assert mod(x.bfloat16()).dtype == torch.bfloat16


def test_fuse_gguf_is_exact():
    from rarefy.kernels.lowbit_cpu.gguf_linear import GGUFLinear, fuse_gguf

    gen = torch.Generator().manual_seed(16)
    parts = [GGUFLinear(gb.quantize(torch.randn(n, 96, generator=gen), "Q4_1"), "Q4_1", (n, 96),
                        torch.randn(n, generator=gen)) for n in (8, 4, 4)]
    fused = fuse_gguf(parts)
    x = torch.randn(3, 96, generator=gen)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    with pytest.raises(RarefyError):
        fuse_gguf([parts[0], GGUFLinear(gb.quantize(torch.randn(4, 96, generator=gen), "Q8_0"), "Q8_0", (4, 96))])
