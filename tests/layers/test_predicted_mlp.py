"""PredictedMLP: the prompt dense, decode through the weight cache (CPU, one row) or masked
(several rows), every output against a float64 reference of down(mask * silu(gate) * up)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rarefy.errors import RarefyError
from rarefy.layers.predicted_mlp import PredictedMLP, use_predicted_mlp
from rarefy.models.loader import load_model
from rarefy.sparsity.predictors import new_predictors, predict_mask


def _model(path, dtype="fp16w"):
    return load_model(str(path), dtype=dtype, with_tokenizer=False).model


def _reference(mlp, x, mask):
    """down(mask * silu(gate x) * up x) in float64 from the MLP's own weights."""
    f = mlp.intermediate_size
    g, u, d = (w.detach().double() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    x64 = x.double().reshape(-1, x.shape[-1])
    act = F.silu(x64 @ g.T) * (x64 @ u.T) * mask.reshape(-1, f).double()
    return (act @ d.T).reshape(x.shape)


@pytest.mark.parametrize("dtype", ["fp16w", "fp32"])
def test_decode_through_the_weight_cache_matches_the_masked_reference(tiny_model_dir, dtype):
    model = _model(tiny_model_dir, dtype)
    preds = new_predictors(model, 0.5, kind="swiglu")
    mlps = [layer.mlp for layer in model.model.layers]
    counts = use_predicted_mlp(model, preds)
    layers = model.model.layers
    assert all(isinstance(layer.mlp, PredictedMLP) and layer.mlp.cache is not None for layer in layers)
    gen = torch.Generator().manual_seed(3)
    h = model.config.hidden_size
    with torch.no_grad():
        for step in range(6):  # consecutive tokens: the cache copies only what changed
            for i, layer in enumerate(layers):
                x = torch.randn(1, 1, h, generator=gen)
                y = layer.mlp(x)
                mask = predict_mask(preds, i, x)
                assert int(mask.sum()) == preds.keep and layer.mlp.cache.n_active == preds.keep
                want = _reference(mlps[i], x, mask)
                assert torch.isfinite(y).all()
                err = ((y.double() - want).norm() / want.norm()).item()
                assert err < 1e-5, (step, i, err)
    assert all(c == [6 * (preds.intermediate_size - preds.keep), 6 * preds.intermediate_size]
               for c in counts.values())


def test_several_rows_masked_and_prompt_dense(tiny_model_dir):
    model = _model(tiny_model_dir)
    preds = new_predictors(model, 0.75, kind="linear", seed=1)
    mlp = model.model.layers[0].mlp
    wrapped = PredictedMLP(mlp, preds, 0, {}, {})
    gen = torch.Generator().manual_seed(5)
    h = model.config.hidden_size
    with torch.no_grad():
        x = torch.randn(3, 1, h, generator=gen)  # three sequences decoding: one mask per row
        mask = predict_mask(preds, 0, x)
        y = wrapped(x)
        want = _reference(mlp, x, mask)
        assert ((y.double() - want).norm() / want.norm()).item() < 1e-5
        prompt = torch.randn(1, 17, h, generator=gen)  # more than 16 tokens: a prompt, dense
        assert torch.equal(wrapped(prompt), mlp(prompt))
        packed = torch.randn(1, 16, h, generator=gen)  # the engine's packed decode step: masked
        want = _reference(mlp, packed, predict_mask(preds, 0, packed))
        assert ((wrapped(packed).double() - want).norm() / want.norm()).item() < 1e-5
        sparse_prompt = PredictedMLP(mlp, preds, 0, {}, {}, sparse_prefill=True)(prompt)
        want = _reference(mlp, prompt, predict_mask(preds, 0, prompt))
        assert ((sparse_prompt.double() - want).norm() / want.norm()).item() < 1e-5


def test_ahead_predictors_read_the_layer_before(tiny_model_dir):
    model = _model(tiny_model_dir)
    preds = new_predictors(model, 0.5, kind="linear", ahead=True, seed=2)
    use_predicted_mlp(model, preds)
    l0, l1 = (layer.mlp for layer in model.model.layers[:2])
    h = model.config.hidden_size
    gen = torch.Generator().manual_seed(9)
    x0, x1 = torch.randn(1, 1, h, generator=gen), torch.randn(1, 1, h, generator=gen)
    with torch.no_grad():
        l0(x0)
        y1 = l1(x1)
    want = _reference(l1.mlp, x1, predict_mask(preds, 1, x0))  # layer 1's mask from layer 0's input
    assert ((y1.double() - want).norm() / want.norm()).item() < 1e-5


def test_refuses_other_models_and_double_swaps(tiny_model_dir):
    model = _model(tiny_model_dir)
    preds = new_predictors(model, 0.5, kind="linear")
    preds.model = dict(preds.model, hidden_size=123)
    with pytest.raises(RarefyError, match="another model"):
        use_predicted_mlp(model, preds)
    preds = new_predictors(model, 0.5, kind="linear")
    use_predicted_mlp(model, preds)
    with pytest.raises(RarefyError, match="already"):
        use_predicted_mlp(model, preds)


def test_engine_decode_steps_run_the_predicted_neurons(tiny_model_dir):
    from rarefy.engine.llm import LLM
    from rarefy.engine.llm_engine import EngineOptions
    from rarefy.layers.sampler import SamplingParams

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    preds = new_predictors(loaded.model, 0.5, kind="linear", seed=3)
    counts = use_predicted_mlp(loaded.model, preds)
    prompts = [[5 + i + j for j in range(20 + i)] for i in range(4)]  # 20-23 tokens: prompts run dense
    params = [SamplingParams(max_tokens=6, ignore_eos=True) for _ in prompts]
    # every prompt in the first step, then decode-only steps of 4 sequences (4 rows a call)
    llm = LLM(loaded=loaded, options=EngineOptions(kv_dtype="fp32", block_size=8, max_step_tokens=128))
    outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [6] * 4
    f = preds.intermediate_size
    masked = counts["0.mlp_neurons"][1] // f  # tokens layer 0 ran with predicted neurons
    assert masked == 4 * 5  # every decode token and no prompt token (the first token comes from the prompt)
    assert counts["0.mlp_neurons"][0] == masked * (f - preds.keep)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decode_with_predictors(tiny_model_dir, compile):
    from rarefy.engine.generate import Generator
    from rarefy.layers.sampler import SamplingParams

    def run(graph):
        loaded = load_model(str(tiny_model_dir), device="cuda", dtype=torch.float32)
        use_predicted_mlp(loaded.model, _on_cuda(new_predictors(loaded.model, 0.5, kind="linear", seed=4)))
        gen = Generator(loaded.model, loaded.tokenizer, use_cuda_graph=graph, compile=compile and graph)
        out, _ = gen.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=12, ignore_eos=True))
        return out[0].token_ids

    eager, graphed = run(False), run(True)
    assert len(graphed) == 12
    if not compile:  # the same kernels replayed: the same tokens
        assert graphed == eager


def _on_cuda(preds):
    preds.nets.to("cuda")
    return preds
