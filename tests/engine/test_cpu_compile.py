"""Generator(cpu_compile=True) on the CPU: the decode step through torch.compile, with the
low-bit projections as opaque C++ ops (their shape-only fake kernels let inductor trace
around them) -- the same greedy tokens as eager decode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rarefy.config import ModelConfig
from rarefy.engine.generate import Generator
from rarefy.layers.lowbit_linear import set_lowbit_mode
from rarefy.layers.sampler import SamplingParams
from rarefy.lowbit.quantize import quantize_model
from rarefy.models.llama import DecoderLM


def test_cpu_compiled_decode_equals_eager():
    from rarefy.kernels import lowbit_cpu
    if not lowbit_cpu.available():
        pytest.skip("the C++ low-bit extension does not build here")
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = DecoderLM(cfg).float().eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.08)
    quantize_model(model, "ternary")
    set_lowbit_mode(model, "fused")  # the C++ ternary op on the CPU
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompt = [[3, 17, 5, 42, 8]]
    (want,), _ = Generator(model, None).generate(prompt, params)
    g = Generator(model, None, cpu_compile=True)
    (got,), st = g.generate(prompt, params)
    assert got.token_ids == want.token_ids
    assert g._cpu_step.options == {"cpp_wrapper": True}  # inductor's C++ wrapper built (no fallback)
    # the step that compiled is warm-up, not decode: its time and token leave the decode rate
    assert st.warmup_s > 0 and st.decode_tokens == params.max_tokens - 2
    (again,), st2 = g.generate(prompt, params)
    assert again.token_ids == want.token_ids and st2.decode_tokens == params.max_tokens - 1


def test_cpu_step_falls_back_to_the_python_wrapper(monkeypatch):
    from rarefy.engine import cpu_compile

    calls = []
    real = torch.compile

    def flaky(model, **kw):  # a C++ wrapper that fails to build on the first call
        calls.append(kw.get("options"))
        if kw.get("options"):
            def broken(*a, **k):
                raise RuntimeError("C++ wrapper build failed")
            return broken
        return real(model, **kw)

    monkeypatch.setattr(cpu_compile.torch, "compile", flaky)
    lin = nn.Linear(4, 3)
    step = cpu_compile.CompiledCpuStep(lin)
    x = torch.randn(2, 4)
    torch.testing.assert_close(step(x), lin(x))
    assert calls == [{"cpp_wrapper": True}, None] and step.options == {}
