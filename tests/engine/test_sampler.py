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
