import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.layers.sampler import SamplingParams, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def test_top_k_only_draws_from_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 100, generator=g)
    top = set(torch.topk(logits[0], 5).indices.tolist())
    p = SamplingParams(temperature=1.0, top_k=5)
    draws = {sample(logits, p, g).item() for _ in range(200)}
    assert draws <= top and len(draws) > 1


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0, top_p=0.7)
    draws = {sample(logits, p, g).item() for _ in range(300)}
    assert draws == {0, 1}


def test_seed_reproducible():
    logits = torch.randn(3, 1000)
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50)
    a = sample(logits, p, torch.Generator().manual_seed(5))
    b = sample(logits, p, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [{"max_tokens": 0}, {"temperature": -1}, {"top_k": -2}, {"top_p": 1.5}])
def test_bad_params(kw):
    with pytest.raises(RarefyError):
        SamplingParams(**kw)


@pytest.mark.parametrize("v", [128256, 49152, 4097, 512])
def test_two_stage_argmax_equals_argmax(v):
    """The GPU's greedy path (argmax in two stages over chunks of the vocabulary) picks the same
    index as argmax: ties go to the first index, across chunks and within one; a vocabulary that
    is not a multiple of the chunk is padded with -inf."""
    from rarefy.layers.sampler import argmax_two_stage

    g = torch.Generator().manual_seed(v)
    x = torch.randn(4, v, generator=g)
    x[1, 3] = x[1, v - 1] = 50.0          # tie across chunks: the first wins
    x[2] = 0.0                            # all equal: index 0
    x[3, v - 1] = 60.0                    # the max in the padded last chunk
    assert torch.equal(argmax_two_stage(x), x.argmax(-1))
    assert argmax_two_stage(x)[1] == 3 and argmax_two_stage(x)[3] == v - 1
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        assert torch.equal(argmax_two_stage(xd), xd.argmax(-1))
