"""Paired A/B of the compiled CPU decode step: inductor's Python wrapper against its C++ wrapper
(rarefy's default, rarefy/engine/cpu_compile.py), two copies of the embedded GGUF-blocks model
in one process, alternating 128-token greedy decodes that must give the same tokens.
docs/engine.md ("C++ wrapper").

    REPS=7 python3 benchmarks/cpu_compile_wrapper_ab.py [threads]
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
from cpu_lowbit_gemv import PROMPT  # noqa: E402
from rarefy.engine.cpu_compile import CompiledCpuStep  # noqa: E402
from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.kernels.lowbit_cpu import gguf_linear  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402
from rarefy.models.default_model import default_model_path  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402
path = default_model_path()
def build():
    eng = load_model(None, dtype="fp32")
    gguf_linear.use_gguf_blocks(eng.model, path)
    gguf_linear.fuse_gguf_projections(eng.model)
    return eng
ea, eb = build(), build()
tk = ea.tokenizer
prompt = tk.encode(PROMPT)
params = SamplingParams(max_tokens=128, ignore_eos=True)
ga = Generator(ea.model, tk, cpu_compile=True)
gb = Generator(eb.model, tk, cpu_compile=True)
ga._cpu_step = CompiledCpuStep(ea.model, options={})  # the Python wrapper
gb._cpu_step = CompiledCpuStep(eb.model)  # the C++ wrapper (default)
for name, g in (("default", ga), ("cpp_wrapper", gb)):
    t0 = time.perf_counter(); g.generate([prompt], params); print(f"warm {name} {time.perf_counter()-t0:.0f}s", flush=True)
A, B = [], []
for i in range(int(os.environ.get("REPS", "7"))):
    (ca,), sa = ga.generate([prompt], params)
    (cb,), sb = gb.generate([prompt], params)
    assert ca.token_ids == cb.token_ids
    A.append(sa.decode_tok_s); B.append(sb.decode_tok_s)
    print(f"pair {i}: default {A[-1]:.1f} cpp_wrapper {B[-1]:.1f}", flush=True)
assert gb._cpu_step.options == {"cpp_wrapper": True}, "the C++ wrapper fell back"
print(f"RESULT threads {threads}: default {statistics.median(A):.1f}, cpp_wrapper {statistics.median(B):.1f}, paired {statistics.median([b/a for a,b in zip(A,B)]):.3f}")
