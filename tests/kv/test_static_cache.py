"""The static cache's paged layout (the GPU default: one query per row goes through the paged
decode kernel) against its [batch, heads, slots, dim] layout with SDPA. On the CPU the paged
decode runs its torch path; on a GPU the Triton kernel (bf16)."""

import pytest
import torch

from rarefy.kv.cache import StaticKVCache


def _run(device, dtype, tol):
    torch.manual_seed(0)
    B, H, HQ, D, S = 2, 2, 4, 64, 48
    plain = StaticKVCache(1, B, S, H, D, dtype, device, paged=False)
    paged = StaticKVCache(1, B, S, H, D, dtype, device, paged=True)

    def rnd(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    # prefill: 19 tokens in row 0, 7 in row 1 (right-padded to 19)
    T = 19
    pos = torch.arange(T, device=device).expand(B, T)
    q, k, v = rnd(B, HQ, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    mask = plain.make_mask(pos, T)
    ref = plain.attend(0, q, k, v, pos, T, mask)
    got = paged.attend(0, q, k, v, pos, T, mask)
    assert torch.allclose(got.float(), ref.float(), atol=tol)
    lens = [19, 7]
    for step in range(25):  # decode: each row at its own position, across page boundaries
        pos = torch.tensor([[lens[0] + step], [lens[1] + step]], device=device)
        kv_len = max(lens) + step + 1
        q, k, v = rnd(B, HQ, 1, D), rnd(B, H, 1, D), rnd(B, H, 1, D)
        mask = plain.make_mask(pos, kv_len)
        ref = plain.attend(0, q, k, v, pos, kv_len, mask)
        got = paged.attend(0, q, k, v, pos, kv_len, mask)
        assert got.shape == ref.shape
        assert torch.isfinite(got).all()
        assert torch.allclose(got.float(), ref.float(), atol=tol), step
    assert paged.nbytes() == plain.nbytes()


def test_paged_static_cache_matches_plain_cpu():
    _run("cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_paged_static_cache_matches_plain_gpu():
    _run("cuda", torch.bfloat16, 3e-2)


def test_paged_layout_default_and_refusal():
    assert not StaticKVCache(1, 1, 32, 2, 16, torch.bfloat16, "cpu").paged  # CPU: the plain layout
    with pytest.raises(ValueError, match="multiples of 16"):
        StaticKVCache(1, 1, 40, 2, 16, torch.bfloat16, "cpu", paged=True)
