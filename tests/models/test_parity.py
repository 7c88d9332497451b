"""rarefy's model code against transformers, logit for logit and token for token."""

import torch

from rarefy.engine.generate import Generator
from rarefy.layers.sampler import SamplingParams
from rarefy.models.loader import load_model
from tests.conftest import VOCAB


def test_logits_match_transformers(random_checkpoint):
    kind, path, ref = random_checkpoint
    ours = load_model(path, dtype=torch.float32, with_tokenizer=False).model
    ids = torch.randint(0, VOCAB, (3, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 1e-4, kind


def test_cached_decode_matches_full_forward(random_checkpoint):
    """Prefill + one-token steps through the KV cache give the full-sequence logits."""
    kind, path, _ = random_checkpoint
    from rarefy.kv.cache import StaticKVCache
    m = load_model(path, dtype=torch.float32, with_tokenizer=False).model
    cfg = m.config
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids)[0]
        cache = StaticKVCache(cfg.num_layers, 1, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
        steps = [m(ids[:, :12], None, cache, kv_len=12)[0]]
        for t in range(12, 20):
            pos = torch.tensor([[t]])
            steps.append(m(ids[:, t:t + 1], pos, cache, kv_len=t + 1)[0])
    got = torch.cat(steps)
    assert (got - full).abs().max().item() < 1e-4, kind


def test_greedy_generation_matches_transformers(random_checkpoint):
    kind, path, ref = random_checkpoint
    m = load_model(path, dtype=torch.float32, with_tokenizer=False).model
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 5)]
    completions, _ = Generator(m, None).generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
    for prompt, c in zip(prompts, completions):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False, pad_token_id=0)
        assert c.token_ids == out[0, len(prompt):].tolist(), kind
