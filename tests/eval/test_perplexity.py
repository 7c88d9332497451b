import math

import pytest
import torch
import torch.nn.functional as F

from rarefy.errors import RarefyError
from rarefy.eval.perplexity import chunk_tokens, perplexity
from rarefy.models.loader import load_model
from tests.conftest import VOCAB


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="fp32", with_tokenizer=False).model


def manual_nlls(model, ids, ctx, first):
    out = []
    for c in range(len(ids) // ctx):
        chunk = torch.tensor(ids[c * ctx:(c + 1) * ctx])
        with torch.no_grad():
            logits = model(chunk[None])[0].double()
        logp = F.log_softmax(logits, -1)
        out += [-logp[t - 1, chunk[t]].item() for t in range(first, ctx)]
    return out


@pytest.mark.parametrize("second_half,batch", [(False, 1), (True, 3)])
def test_matches_manual_computation(model, second_half, batch):
    ids = torch.randint(0, VOCAB, (5 * 24 + 7,), generator=torch.Generator().manual_seed(0)).tolist()
    res = perplexity(model, ids, ctx=24, score_second_half=second_half, batch_size=batch)
    nll = manual_nlls(model, ids, 24, 12 if second_half else 1)
    mean = sum(nll) / len(nll)
    sd = math.sqrt(sum((x - mean) ** 2 for x in nll) / (len(nll) - 1))
    assert res.chunks == 5 and res.tokens == len(nll)
    assert abs(res.ppl - math.exp(mean)) / math.exp(mean) < 1e-5
    assert abs(res.stderr - math.exp(mean) * sd / math.sqrt(len(nll))) < 1e-4 * res.ppl


def test_chunk_limit_and_errors(model):
    ids = list(range(100))
    assert chunk_tokens(ids, 30, 2).shape == (2, 30)
    assert perplexity(model, ids, ctx=30, max_chunks=2).chunks == 2
    with pytest.raises(RarefyError, match="fewer than one chunk"):
        perplexity(model, ids[:10], ctx=30)
    with pytest.raises(RarefyError, match="context"):
        perplexity(model, ids, ctx=100_000)
    with pytest.raises(RarefyError, match="--chunks"):
        perplexity(model, ids, ctx=30, max_chunks=0)
