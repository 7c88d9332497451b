"""On a GPU: graph-captured decode equals eager decode, and bf16 logits track fp32."""

import pytest
import torch

from rarefy.engine.generate import Generator
from rarefy.layers.sampler import SamplingParams
from rarefy.models.loader import load_model
from tests.conftest import VOCAB

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graph_decode_equals_eager(random_checkpoint, dtype):
    _, path, _ = random_checkpoint
    m = load_model(path, device="cuda", dtype=dtype, with_tokenizer=False).model
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 13, 1)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager, _ = Generator(m, None, use_cuda_graph=False).generate(prompts, params)
    graphed_gen = Generator(m, None, use_cuda_graph=True)
    graphed, stats = graphed_gen.generate(prompts, params)
    again, _ = graphed_gen.generate(prompts, params)  # reuses the captured graph
    assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]
    assert [c.token_ids for c in again] == [c.token_ids for c in eager]
    assert stats.warmup_s > 0


def test_bf16_cuda_logits_track_fp32_cpu(random_checkpoint):
    kind, path, _ = random_checkpoint
    ref = load_model(path, dtype="fp32", with_tokenizer=False).model
    m = load_model(path, device="cuda", dtype="bf16", with_tokenizer=False).model
    m.fuse_projections()
    ids = torch.randint(0, VOCAB, (2, 33))
    with torch.no_grad():
        want = ref(ids).double()
        got = m(ids.cuda()).double().cpu()
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < 2e-2, kind
