"""Per-KV-head windows: the PerHead policy (mask = float reference), config files, the
per-(layer, head) allocation, and the head-grouped paged cache (own block tables per
(layer, KV head): eviction never frees a block still read, decode = simulated policy)."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.kv.blocks import KVCacheFull
from rarefy.kv.paged import HeadGroupedKVCache, PagedKVCache, layer_blocks_for
from rarefy.kv.policies import (
    Dense,
    PerHead,
    PolicyConfig,
    TopK,
    Window,
    load_policy_config,
    parse_policy,
    policy_config_from_dict,
)
from rarefy.kv.simulate import simulated_attention
from rarefy.kv.window_budget import (
    WindowErrors,
    allocate_head_windows,
    head_config,
    measure_window_errors,
    policy_config_text,
    window_for_blocks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def W(sinks, window, stride=0, block=4):
    return Window(sinks, window, stride, block)


# ----------------------------------------------------------------------------- the policy

def _reference(q, k, v, heads, block):
    """float64 attention with each KV head's window mask written out per (query, key)."""
    B, Hq, T, D = q.shape
    G = Hq // len(heads)
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for hq in range(Hq):
        p = heads[hq // G]
        kv = hq // G
        for t in range(T):
            keep = []
            for j in range(t + 1):
                if isinstance(p, Dense):
                    keep.append(j)
                    continue
                b = j // block
                start = max(0, t - p.window + 1) // block
                if b < -(-p.sinks // block) or b >= start or (p.stride and b % p.stride == 0):
                    keep.append(j)
            idx = torch.tensor(keep)
            s = torch.einsum("bd,bnd->bn", q[:, hq, t].double(), k[:, kv, idx].double()) / math.sqrt(D)
            out[:, hq, t] = torch.einsum("bn,bnd->bd", torch.softmax(s, -1), v[:, kv, idx].double())
    return out


@pytest.mark.parametrize("seed", range(3))
def test_per_head_mask_equals_float_reference(seed):
    g = torch.Generator().manual_seed(seed)
    heads = (Dense(), W(4, 9), W(0, 5, 3))
    p = PerHead(heads)
    B, Hq, T, D = 2, 6, 37, 16
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, 3, 3))
    got = simulated_attention(q, k, v, torch.arange(T), "fp32", p)
    torch.testing.assert_close(got.double(), _reference(q, k, v, heads, 4), rtol=1e-5, atol=1e-5)
    # the score path (apply) masks the same keys as keep_mask (decode uses apply)
    scores = torch.randn(B, Hq, T, T, generator=g)
    masked = p.apply(scores, torch.arange(T), torch.arange(T))
    assert torch.equal(masked != float("-inf"), p.query_mask(torch.arange(T), torch.arange(T), Hq).expand(B, -1, -1,
                                                                                                         -1))


def test_per_head_memory_and_spec():
    p = parse_policy("dense | window:sinks=4,window=9,block=4 | window:sinks=0,window=5,block=4")
    assert isinstance(p, PerHead) and p.heads == (Dense(), W(4, 9), W(0, 5))
    assert p.evicts and not PerHead((Dense(), Dense())).evicts
    assert parse_policy(p.spec) == p
    assert p.memory_fraction(64, 4) == pytest.approx(sum(h.memory_fraction(64, 4) for h in p.heads) / 3)
    cfg = PolicyConfig(Dense(), {1: p})
    assert cfg.per_head and not PolicyConfig(W(4, 9)).per_head
    # Σ over layers of the heads' mean blocks, at the peak
    assert cfg.memory_fraction(2, 64, 4) == pytest.approx((1 + p.memory_fraction(64, 4)) / 2)


def test_bad_per_head_specs_give_clear_errors(tmp_path):
    with pytest.raises(RarefyError, match="must be dense or window"):
        parse_policy("dense | topk:k=4")
    with pytest.raises(RarefyError, match="empty head policy"):
        parse_policy("dense | | dense")
    with pytest.raises(RarefyError, match="one block size"):
        parse_policy("window:sinks=4,window=9,block=4 | window:sinks=4,window=9,block=8")
    cfg = PolicyConfig(Dense(), {1: parse_policy("dense | window:sinks=4,window=9,block=4")})
    with pytest.raises(RarefyError, match=r"layer 1: .* lists 2 policies but the model has 3 KV heads"):
        cfg.check(4, 3)
    with pytest.raises(RarefyError, match="KV heads"):
        PagedKVCache(4, 3, 8, 10, 4, "fp32", "cpu", cfg)
    with pytest.raises(RarefyError, match="empty per-head list"):
        policy_config_from_dict({"layers": {"1": []}})
    with pytest.raises(RarefyError, match="one per KV head"):
        policy_config_from_dict({"layers": {"1": 5}})
    path = tmp_path / "bad.toml"
    path.write_text('default = "dense"\n[layers]\n"2" = ["dense", "window:sinks=4,window=9,block=4", "topk:k=8"]\n')
    with pytest.raises(RarefyError, match="must be dense or window"):
        load_policy_config(str(path))


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_round_trip(tmp_path, suffix):
    cfg = PolicyConfig(W(16, 97, block=16), {
        0: Dense(),
        3: PerHead((Dense(), W(16, 33, block=16), W(64, 481, block=16))),
        4: PerHead((Dense(), W(16, 33, block=16), W(64, 481, block=16))),
        7: TopK(k=8),
    })
    path = str(tmp_path / f"c{suffix}")
    with open(path, "w") as f:
        f.write(policy_config_text(cfg, path, ["a header"]))
    back = load_policy_config(path)
    assert back.default == cfg.default and back.layers == cfg.layers
    with open(path) as f:
        text = f.read()
    assert '"3-4"' in text  # equal consecutive layers are written as one range
    if suffix == ".json":
        assert json.loads(text)["layers"]["3-4"] == [h.spec for h in cfg.layers[3].heads]


def test_checked_in_per_layer_configs_still_load():
    d = os.path.join(REPO, "benchmarks", "kv_policies")
    for name in os.listdir(d):
        if name.endswith(".toml") and "heads" not in name:
            cfg = load_policy_config(os.path.join(d, name))
            assert not cfg.per_head
            cfg.check(30, 3)


# ----------------------------------------------------------------------------- allocation

def _head_table(L=3, H=2, sizes=(2, 4, 8, 16)):
    cands = [window_for_blocks(m, 4, 64, 4) for m in sizes]
    # (layer, head) 0/0 loses a lot with small windows; 1/1 a little; the others nothing
    zero = [0.0] * len(sizes)
    heads = [[[1.0, 0.5, 0.2, 0.0], zero], [zero, [0.1, 0.05, 0.02, 0.0]], [zero, zero]]
    per_layer = [[sum(x) for x in zip(*h)] for h in heads]
    return WindowErrors(cands, per_layer, per_layer, 64, 4, 100, "test", out_heads=heads, cos_heads=heads)


def test_head_allocation_respects_the_budget():
    t = _head_table()
    costs = t.blocks()
    for budget in (0.125, 0.25, 0.4, 1.0):
        a = allocate_head_windows(t, budget)
        assert sum(map(sum, a.blocks)) <= budget * 3 * 2 * 16 + 1e-9
        assert a.memory_fraction == pytest.approx(sum(map(sum, a.blocks)) / (3 * 2 * 16))
        # the config's own accounting agrees with the allocation's
        assert a.config.memory_fraction(3, 64, 4) == pytest.approx(a.memory_fraction)
        for layer in range(3):
            for h in range(2):
                assert costs[t.candidates.index(a.windows[layer][h])] == a.blocks[layer][h]
    a = allocate_head_windows(t, 0.25)  # 24 head-blocks: 12 at minimum, 12 to give
    # the lossy head grows first; 8 -> 16 would overspend, so the other lossy head gets the rest;
    # heads whose error never drops stay at the smallest window
    assert a.blocks == [[8, 2], [2, 8], [2, 2]]
    assert isinstance(a.config.for_layer(0), PerHead)
    with pytest.raises(RarefyError, match="below the smallest windows"):
        allocate_head_windows(t, 0.05)
    with pytest.raises(RarefyError, match="no per-KV-head errors"):
        allocate_head_windows(WindowErrors(t.candidates, t.out, t.cos, 64, 4, 100), 0.25)


def test_head_table_round_trips_and_merges(tmp_path):
    t = _head_table()
    path = str(tmp_path / "t.json")
    t.save(path)
    back = WindowErrors.load(path)
    assert back.out_heads == t.out_heads and back.num_kv_heads == 2
    m = t.merge(WindowErrors([window_for_blocks(3, 4, 64, 4)], [[0.3]] * 3, [[0.3]] * 3, 64, 4, 100,
                             out_heads=[[[0.3], [0.3]]] * 3, cos_heads=[[[0.3], [0.3]]] * 3))
    assert len(m.out_heads[0][0]) == 5


def test_head_config_collapses_agreeing_heads():
    a, b = W(4, 9), W(4, 21)
    cfg = head_config([[a, a], [a, b], [a, a]])
    assert cfg.default == a and cfg.layers == {1: PerHead((a, b))}


def test_measured_head_errors_are_consistent(tiny_model_dir):
    from rarefy.models.loader import load_model

    model = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32).model
    ids = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    cands = [window_for_blocks(m, 4, 64, 4) for m in (2, 4, 16)]
    t = measure_window_errors(model, ids, cands, "fp32", heads=True)
    H = model.config.num_kv_heads
    assert t.num_kv_heads == H and len(t.out_heads) == model.config.num_layers
    for layer in range(t.num_layers):
        # a window covering everything changes nothing; the per-head cosines average to the layer's
        assert all(abs(t.out_heads[layer][h][2]) < 1e-10 for h in range(H))
        for c in range(3):
            assert sum(t.cos_heads[layer][h][c] for h in range(H)) / H == pytest.approx(t.cos[layer][c], abs=1e-9)


# ----------------------------------------------------------------------------- the paged cache

HEADS = PolicyConfig(W(4, 6), {1: PerHead((W(4, 17), Dense())), 2: PerHead((W(0, 5, 2), W(4, 6)))})


def _reads(policy, pos: int, block: int) -> set[int]:
    blocks = range(pos // block + 1)
    if policy is None or not policy.evicts:
        return set(blocks)
    return {b for b in blocks if bool(policy.block_keep(torch.tensor(b), torch.tensor(pos)))}


def test_head_grouped_cache_is_built_for_per_head_policies():
    c = PagedKVCache(3, 2, 8, 20, 4, "fp32", "cpu", HEADS)
    assert isinstance(c, HeadGroupedKVCache) and c.grouped
    assert (c.model_num_layers, c.model_num_kv_heads, c.num_layers, c.num_kv_heads) == (3, 2, 6, 1)
    assert c.num_layer_blocks == 20 * 6  # head-blocks: the memory of 20 dense blocks
    assert not isinstance(PagedKVCache(3, 2, 8, 20, 4, "fp32", "cpu", W(4, 6)), HeadGroupedKVCache)


@pytest.mark.parametrize("seed", range(3))
def test_head_eviction_never_frees_a_block_still_read(seed):
    rng = random.Random(seed)
    c = PagedKVCache(3, 2, 8, 30, 4, "fp32", "cpu", HEADS)
    virtual = [c.layer_policy[v] for v in range(6)]
    live: dict = {}
    for step in range(120):
        if len(live) < 3 and rng.random() < 0.3:
            c.add_sequence(step)
            live[step] = 0
        if not live:
            continue
        if rng.random() < 0.05:
            sid = rng.choice(list(live))
            c.free_sequence(sid)
            del live[sid]
            continue
        ids = list(live)
        nums = [rng.choice([1, 1, 1, 2, 5, 9]) for _ in ids]
        try:
            meta = c.begin_step(ids, nums)
        except KVCacheFull:
            continue
        seen = []
        for row, (sid, n) in enumerate(zip(ids, nums)):
            start = live[sid]
            live[sid] += n
            for vl in range(6):
                g, _ = c.blocks.layer_group[vl]
                s = c.blocks.groups[g].seqs[sid]
                for pos in range(start, start + n):
                    assert _reads(virtual[vl], pos, 4) <= set(s.logical)
                table = meta.layers[vl].block_tables[row, :len(s.blocks)].tolist()
                assert all(c.allocator.refcount(u) == 1 for u in table)
                seen += table
        assert len(seen) == len(set(seen))  # no head-block in two tables
        assert c.allocator.num_used == sum(c.blocks.held(i) for i in live)
    for sid in list(live):
        c.free_sequence(sid)
    assert c.allocator.num_free == c.num_layer_blocks


def test_head_decode_holds_what_the_accounting_says():
    c = PagedKVCache(3, 2, 8, 40, 4, "fp32", "cpu", HEADS)
    c.add_sequence(0)
    peak = 0
    for n in range(1, 70):
        c.begin_step([0], [1])
        want = sum(p.held_blocks(n, 4) if p is not None and p.evicts else -(-n // 4) for p in c.layer_policy)
        assert c.blocks.held(0) == want
        peak = max(peak, want)
    assert layer_blocks_for(c.layer_policy, 69, 4) == peak
    assert HEADS.memory_fraction(3, 69, 4) == pytest.approx(peak / (6 * 18))


def test_head_capacity_by_bytes():
    from rarefy.config import ModelConfig
    from rarefy.kv import quant

    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    head_block = quant.bytes_per_token("bf16", 1, 1, 16) * 4
    c = PagedKVCache.for_model(cfg, device="cpu", block_size=4, memory_bytes=head_block * 23 + 7, policy=HEADS)
    assert isinstance(c, HeadGroupedKVCache) and c.num_layer_blocks == 23 and c.nbytes() == 23 * head_block


def _tiny(tiny_model_dir):
    from rarefy.models.loader import load_model
    return load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)


TINY_HEADS = [PolicyConfig(W(4, 6), {1: PerHead((W(4, 17), Dense()))}),
              PolicyConfig(PerHead((W(0, 9, 2), W(8, 5))), {1: TopK(k=6)})]


@pytest.mark.parametrize("config", TINY_HEADS, ids=["heads+window", "heads+topk"])
def test_head_grouped_cache_equals_simulated_policy(tiny_model_dir, config):
    """Prefill chunks and decodes through the head-grouped cache give the logits of a
    full-context forward with the same per-head policy simulated."""
    from rarefy.kv.simulate import eval_attention

    model = _tiny(tiny_model_dir).model
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), eval_attention(model, "fp32", config):
        want = model(ids)
    cache = PagedKVCache.for_model(cfg, device="cpu", kv_dtype="fp32", block_size=4, tokens=2 * 64, policy=config)
    assert isinstance(cache, HeadGroupedKVCache)
    for r in (0, 1):
        cache.add_sequence(r)
    outs, start = [], 0
    with torch.no_grad():
        for n in (13, 1, 1, 7, 1, 1, 1, 20):
            cache.begin_step([0, 1], [n, n])
            pos = torch.arange(start, start + n).expand(2, n)
            outs.append(model(ids[:, start:start + n], pos, cache))
            start += n
    got = torch.cat(outs, dim=1)
    if any(not p.evicts and p.name != "dense" for p in config.layers.values()):
        rows = [13, 14, 22, 23, 24]  # top-k masks decode only (docs/kv-cache.md)
        got, want = got[:, rows], want[:, rows]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generate_greedy_with_per_head_windows(tiny_model_dir):
    from rarefy.engine.generate import Generator, KVOptions
    from rarefy.kv.simulate import eval_attention
    from rarefy.layers.sampler import SamplingParams

    loaded = _tiny(tiny_model_dir)
    model = loaded.model
    config = TINY_HEADS[0]
    prompt = torch.randint(3, model.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    want = list(prompt)
    with torch.no_grad(), eval_attention(model, "fp32", config):
        for _ in range(30):
            want.append(int(model(torch.tensor([want]))[0, -1].argmax()))
    gen = Generator(model, loaded.tokenizer, kv=KVOptions(kv_dtype="fp32", block_size=4, policy=config))
    out, _ = gen.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))
    assert out[0].token_ids == want[len(prompt):]


def test_engine_with_per_head_windows_and_a_small_cache(tiny_model_dir):
    """Continuous batching over a head-grouped cache gives each request Generator's tokens;
    every head-block comes back."""
    from rarefy.engine.generate import Generator, KVOptions
    from rarefy.engine.llm import LLM
    from rarefy.engine.llm_engine import EngineOptions
    from rarefy.layers.sampler import SamplingParams

    tiny = _tiny(tiny_model_dir)
    config = TINY_HEADS[0]
    rng = random.Random(5)
    prompts = [[rng.randint(3, 300) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    params = [SamplingParams(max_tokens=rng.randint(8, 30), ignore_eos=True) for _ in prompts]
    gen = Generator(tiny.model, tiny.tokenizer, kv=KVOptions(kv_dtype="fp32", block_size=4, policy=config))
    want = [gen.generate([p], sp)[0][0].token_ids for p, sp in zip(prompts, params)]
    cfg = tiny.model.config
    head_block = 4 * 2 * cfg.head_dim * 4
    llm = LLM(loaded=tiny, options=EngineOptions(kv_dtype="fp32", block_size=4, max_step_tokens=16,
                                                 kv_memory_bytes=80 * head_block, attention_policy=config))
    cache = llm.engine.cache
    assert isinstance(cache, HeadGroupedKVCache) and cache.num_layer_blocks == 80
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert cache.allocator.num_free == cache.allocator.num_blocks


def test_cli_per_head(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rarefy.cli import app

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "h.toml"
    run = CliRunner().invoke
    args = ["calibrate-attention", "--model", str(tiny_model_dir), "--calib", str(text), "--ctx", "64",
            "--chunks", "2", "--kv-block-size", "4", "--sinks", "4", "--budget", "0.4", "--per-head",
            "--out", str(out), "--errors-out", str(tmp_path / "e.json")]
    r = run(app, args)
    assert r.exit_code == 0, r.output
    cfg = load_policy_config(str(out))
    cfg.check(2, 2)
    assert cfg.memory_fraction(2, 64, 4) <= 0.4 + 1e-9 and cfg.evicts
    # from the saved table (it has the per-head errors), another budget, as JSON
    r = run(app, ["calibrate-attention", "--errors", str(tmp_path / "e.json"), "--budget", "0.3", "--sinks", "4",
                  "--per-head", "--out", str(tmp_path / "h2.json"), "--json"])
    assert r.exit_code == 0, r.output
    assert load_policy_config(str(tmp_path / "h2.json")).memory_fraction(2, 64, 4) <= 0.3 + 1e-9
    # a per-layer table has no per-head errors: a clear message
    r = run(app, args[:-5] + ["--out", str(tmp_path / "l.toml"), "--errors-out", str(tmp_path / "l.json")])
    assert r.exit_code == 0, r.output
    WindowErrors.load(str(tmp_path / "l.json"))
    r = run(app, ["calibrate-attention", "--errors", str(tmp_path / "l.json"), "--per-head", "--sinks", "4",
                  "--out", str(tmp_path / "x.toml")])
    assert r.exit_code != 0 and "no per-KV-head errors" in r.output
    r = run(app, args[:-2] + ["--metric", "grad", "--overwrite"])
    assert r.exit_code != 0 and "--per-head takes" in r.output
    # the loss-based metric, measured and allocated per head
    r = run(app, args[:-4] + ["--out", str(tmp_path / "f.json"), "--metric", "fisher", "--fisher-samples", "1",
                              "--errors-out", str(tmp_path / "f-errors.json")])
    assert r.exit_code == 0, r.output
    assert WindowErrors.load(str(tmp_path / "f-errors.json")).fisher_heads is not None
    assert load_policy_config(str(tmp_path / "f.json")).memory_fraction(2, 64, 4) <= 0.4 + 1e-9
    r = run(app, args[:-4] + ["--out", str(tmp_path / "g.json"), "--metric", "fisher", "--fisher-samples", "0"])
    assert r.exit_code != 0 and "--fisher-samples" in r.output


def test_fisher_metric_estimates_the_kl_of_one_windowed_head(tiny_model_dir):
    """The `fisher` errors (sampled-label backward passes) estimate the KL between the dense and
    the windowed next-token distributions of the scored tokens: ≥ 0, 0 for a window that keeps
    everything, and close to the KL measured by running the model with that head windowed."""
    import torch.nn.functional as F

    from rarefy.kv.simulate import eval_attention
    from rarefy.models.loader import load_model

    model = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32).model
    ids = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    cands = [window_for_blocks(m, 4, 64, 4) for m in (4, 16)]
    t = measure_window_errors(model, ids, cands, "fp32", heads=True, fisher=32)
    assert t.fisher is not None and len(t.fisher_heads[0]) == model.config.num_kv_heads

    def kl(cfg):
        tot = 0.0
        idx = torch.arange(31, 63)
        for c in ids:
            with torch.no_grad():
                p = F.log_softmax(model(c[None], last_index=idx).float(), -1)
                with eval_attention(model, "fp32", cfg):
                    q = F.log_softmax(model(c[None], last_index=idx).float(), -1)
            tot += float((p.exp() * (p - q)).sum())
        return tot / (2 * 32)

    for layer in range(model.config.num_layers):
        for h in range(model.config.num_kv_heads):
            assert t.fisher_heads[layer][h][1] == pytest.approx(0.0, abs=1e-12)
            est = t.fisher_heads[layer][h][0]
            heads = tuple(cands[0] if x == h else Dense() for x in range(model.config.num_kv_heads))
            true = kl(PolicyConfig(Dense(), {layer: PerHead(heads)}))
            assert est > 0 and 0.4 * true < est < 2.5 * true, (layer, h, est, true)
    # and the out errors are unchanged by the extra passes (the dense input is counted once)
    t0 = measure_window_errors(model, ids, cands, "fp32", heads=True)
    for a, b in zip(t.out_heads, t0.out_heads):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-12)
    a = allocate_head_windows(t, 0.5, "fisher")
    assert a.memory_fraction <= 0.5


def test_tables_of_the_same_candidates_pool_by_tokens():
    t = _head_table()
    u = WindowErrors(t.candidates, [[2 * x for x in r] for r in t.out], t.cos, 64, 4, 300, "other",
                     out_heads=[[[2 * x for x in h] for h in layer] for layer in t.out_heads], cos_heads=t.cos_heads)
    p = t.pooled(u)
    assert p.tokens == 400 and p.out[0][0] == pytest.approx(0.25 * t.out[0][0] + 0.75 * u.out[0][0])
    assert p.out_heads[0][0][0] == pytest.approx(1.75) and p.fisher is None
    with pytest.raises(RarefyError, match="same candidates"):
        t.pooled(WindowErrors(t.candidates[:2], [r[:2] for r in t.out], [r[:2] for r in t.cos], 64, 4, 100))
