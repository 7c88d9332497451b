"""llama.cpp through llama-cpp-python: the CPU peer the low-bit benchmark measures against.

A benchmark peer only, never a dependency of rarefy. ``ensure_llama_cpp`` installs the pinned
version when it is missing (pip builds llama.cpp from source: a few minutes on 2 cores) and,
when that build crashes on this CPU, rebuilds it without llama.cpp's AMX path.
``llama_cpp_rate`` times greedy decode the way the rarefy rows are timed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time

PROMPT = "The history of the city of Paris begins in the"


def llama_cpp_version() -> str:
    import llama_cpp
    return llama_cpp.__version__


#: the peer version the published figures used; installed when missing
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
#: llama.cpp's AMX matmul path faults (GP in ldtilecfg) on some VMs that advertise AMX
#: (seen 2026-11-23 on this project's CPU machine); the fallback build leaves it out
#: (GGML_NATIVE would turn AMX on again, so the ISA is listed: this CPU's AVX-512 set, no AMX)
LLAMA_CPP_NO_AMX = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                    "-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
                    "-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")


def _llama_cpp_works(model_path: str, threads: int) -> bool:
    """Whether llama.cpp runs the benchmark's own call (a few tokens), in a child: a bad build
    dies by a signal rather than raising, and only on the paths a real run takes."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import llama_cpp_peer as c; "
            "r = c.llama_cpp_rate(sys.argv[2], int(sys.argv[3]), c.PROMPT, 4); print('ok' if r else 'missing')")
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), model_path,
                        str(threads)], capture_output=True, text=True, timeout=600)
    return r.returncode == 0 and r.stdout.strip().endswith("ok")


def _pip_install_llama_cpp(cmake_args: str | None) -> bool:
    env = dict(os.environ)
    extra = []
    if cmake_args:
        env["CMAKE_ARGS"] = cmake_args
        extra = ["--force-reinstall", "--no-deps", "--no-cache-dir"]
    how = f" with CMAKE_ARGS={cmake_args!r}" if cmake_args else ""
    print(f"installing {LLAMA_CPP_PIN}{how} (builds llama.cpp from source, a few minutes)", flush=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *extra, LLAMA_CPP_PIN], env=env)
    importlib.invalidate_caches()
    return r.returncode == 0


def ensure_llama_cpp(install: bool, model_path: str, threads: int) -> bool:
    """Whether a working llama-cpp-python is importable. With ``install``: pip-build it when it
    is missing, and rebuild it without the AMX path when the build crashes on this CPU. A peer
    only, never a dependency of rarefy."""
    try:
        import llama_cpp  # noqa: F401
        present = True
    except ImportError:
        present = False
    if not present:
        if not install:
            return False
        if not _pip_install_llama_cpp(None):
            print(f"could not install {LLAMA_CPP_PIN}: no llama.cpp figure", flush=True)
            return False
    if _llama_cpp_works(model_path, threads):
        return True
    if not install:
        print("llama-cpp-python crashes on this machine (--no-install-peer: not rebuilt): no llama.cpp figure")
        return False
    print("llama-cpp-python crashes on this machine: rebuilding it without the AMX path", flush=True)
    if _pip_install_llama_cpp(LLAMA_CPP_NO_AMX) and _llama_cpp_works(model_path, threads):
        return True
    print("llama-cpp-python still does not run: no llama.cpp figure", flush=True)
    return False


def llama_cpp_rate(path: str, threads: int, prompt: str, new_tokens: int) -> tuple[float, list[int]] | None:
    """llama.cpp decode tok/s (time from the first to the last generated token) and its tokens."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                verbose=False, logits_all=False)
    toks = llm.tokenize(prompt.encode(), add_bos=True)
    out, stamps = [], []
    for tok in llm.generate(toks, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        out.append(int(tok))
        if len(out) == new_tokens:
            break
    del llm
    return (new_tokens - 1) / (stamps[-1] - stamps[0]), out
