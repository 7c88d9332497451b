"""GPU timing helpers shared by the benchmarks (moved out of benchmarks/gemv_bench.py).

Decode-sized matmuls are memory bound and short (10-500 µs), so two things decide whether a
number means anything:

* L2 must never serve a repeat. An H100 has 50 MB of L2; a 4096x4096 bf16 weight (32 MB)
  timed in a loop would mostly come from it. Every timer here takes ``launch(i)`` and
  rotates ``i`` over ``nbuf`` copies of the operands (:func:`n_buffers` picks ``nbuf`` so
  the copies together are at least 4x L2).
* Launch overhead must not be timed. :func:`graph_time_us` captures back-to-back launches
  in a CUDA graph and replays it (the way decode runs); :func:`do_bench_us` is Triton's
  ``do_bench`` median for kernels that cannot be captured.

:func:`copy_bandwidth_tbs` measures the device-to-device copy bandwidth (read + write), the
practical ceiling a memory-bound kernel is compared with.

Triton is imported lazily (only :func:`do_bench_us` needs it; :func:`copy_bandwidth_tbs` falls
back to CUDA events), so importing this module is safe on machines without a GPU.
"""

from __future__ import annotations

import math
import statistics

import torch

#: L2 size assumed when the device does not report one (an H100's 50 MB).
L2_BYTES = 50 * 2**20


def l2_bytes(device=None) -> int:
    """The device's L2 cache size in bytes (``L2_BYTES`` when torch does not say)."""
    try:
        props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
        size = int(getattr(props, "L2_cache_size", 0) or 0)
        return size if size > 0 else L2_BYTES
    except Exception:
        return L2_BYTES


def n_buffers(nbytes: int, cache_bytes: int = L2_BYTES, factor: int = 4, cap: int | None = None) -> int:
    """Copies of an operand of `nbytes` to rotate over so together they exceed factor x cache (>= 2)."""
    n = max(2, math.ceil(factor * cache_bytes / max(1, nbytes)))
    return min(n, cap) if cap else n


def graph_time_us(launch, nbuf: int, device, reps: int | None = None, samples: int = 7) -> float:
    """Median per-launch time (µs) of back-to-back launches replayed from a CUDA graph.

    ``launch(i)`` runs the kernel on operand copy ``i`` (0 <= i < nbuf). It is called once per
    copy on a side stream first (lazy initialisation, workspaces), then ``reps`` launches
    (default ``max(2 * nbuf, 16)``) cycling over the copies are captured in one graph, which
    is replayed once to warm up and ``samples`` times timed. Raises whatever capture raises
    when the launch cannot be captured (host synchronisation, unsupported op, ...).
    """
    reps = reps or max(2 * nbuf, 16)
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for i in range(nbuf):
            launch(i)
    torch.cuda.current_stream(device).wait_stream(s)
    torch.cuda.synchronize(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(reps):
            launch(r % nbuf)
    g.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(samples):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    del g
    return statistics.median(times)


def do_bench_us(launch, nbuf: int, clean_l2: bool = False, warmup: int = 25, rep: int = 100) -> float:
    """``triton.testing.do_bench`` median (µs) while rotating over `nbuf` operand copies.

    do_bench empties L2 before every call by zero-filling a 256 MB buffer,
    which leaves L2 full of dirty lines that the timed kernel then has to
    write back (up to 50 MB of extra DRAM traffic). With ``clean_l2`` that
    flush is swapped for a read of the same buffer: L2 is still emptied of
    the weights and the GPU stays ahead of the CPU, but nothing is left to
    write back.
    """
    import triton.runtime
    import triton.testing

    state = {"i": 0}

    def fn():
        launch(state["i"] % nbuf)
        state["i"] += 1

    drv = triton.runtime.driver.active
    if not clean_l2:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3
    sink = torch.empty((), dtype=torch.int32, device="cuda")
    drv.clear_cache = lambda cache: torch.amax(cache, out=sink)
    try:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3
    finally:
        del drv.clear_cache


def copy_bandwidth_tbs(device, nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting read + write (2 x nbytes per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    try:
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    except ImportError:  # no Triton: CUDA events around a few copies
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(20):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        ms = statistics.median(times)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e12
