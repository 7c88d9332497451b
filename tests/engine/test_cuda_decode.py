"""On a GPU: graph-captured decode equals eager decode, and bf16 logits track fp32."""

import pytest
import torch

from rarefy.engine.generate import Generator
from rarefy.layers.sampler import SamplingParams
from rarefy.models.loader import load_model
from tests.conftest import VOCAB

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,compile", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_graph_decode_equals_eager(random_checkpoint, dtype, compile):
    _, path, _ = random_checkpoint
    m = load_model(path, device="cuda", dtype=dtype, with_tokenizer=False).model
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 13, 1)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager, _ = Generator(m, None, use_cuda_graph=False).generate(prompts, params)
    graphed_gen = Generator(m, None, use_cuda_graph=True, compile=compile)
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


def test_cli_generate_on_cuda(tiny_model_dir):
    import json

    from typer.testing import CliRunner

    from rarefy.cli import app
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), "--device", "cuda",
                                 "-n", "12", "--ignore-eos", "--json", "The quick brown fox"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 12 and out["device"].startswith("cuda") and out["dtype"] == "bfloat16"
    assert out["warmup_s"] > 0 and out["decode_tok_s"] > 0


def test_compiled_bf16_decode_step_matches_eager(random_checkpoint):
    """The compiled + graphed step (Triton GEMV inside) against the eager step, in bf16."""
    from rarefy.engine.cuda_graph import GraphedDecodeStep
    from rarefy.kv.cache import StaticKVCache
    kind, path, _ = random_checkpoint
    m = load_model(path, device="cuda", dtype="bf16", with_tokenizer=False).model
    m.fuse_projections()
    cfg = m.config
    caches = [StaticKVCache(cfg.num_layers, 2, 64, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, "cuda")
              for _ in range(2)]
    step = GraphedDecodeStep(m, caches[1], 2, compile=True)
    ids = torch.randint(0, VOCAB, (2, 10), device="cuda")
    nxt = torch.randint(0, VOCAB, (2, 1), device="cuda")
    pos = torch.full((2, 1), 10, device="cuda")
    with torch.inference_mode():
        for c in caches:
            m(ids, None, c, kv_len=10)
        want = m(nxt, pos, caches[0])[:, -1].double()
        got = step(nxt, pos).double()
    assert torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < 2e-2, kind
