"""CPU timing for the benchmarks: last-level cache size, median µs of back-to-back calls
rotating over weight copies, and memcpy bandwidth (used by `rarefy bench kernels` and `attention`)."""

from __future__ import annotations

import math
import statistics
import time

import torch


def _cpu_cache_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            v = f.read().strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(v[-1], 1)
        return int(v.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 * 2**20


def cpu_time_us(launch, nbuf: int, samples: int = 5, sample_s: float = 0.01) -> float:
    """Median µs per call of back-to-back ``launch(i)`` calls cycling over `nbuf` copies.

    Each timed burst lasts about `sample_s`; the copy index keeps cycling across bursts, so a
    copy is not touched again until all the others have been.
    """
    warm = min(nbuf, 8)
    t0 = time.perf_counter()
    for i in range(warm):
        launch(i)
    per = (time.perf_counter() - t0) / warm
    calls = max(1, math.ceil(sample_s / max(per, 1e-7)))
    times, j = [], warm
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            launch(j % nbuf)
            j += 1
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def cpu_copy_bandwidth_tbs(nbytes: int = 256 * 2**20, samples: int = 5) -> float:
    """memcpy bandwidth in TB/s, counting read + write."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e12


def time_rotating(fn, x, ws, rounds: int, clock=time.perf_counter) -> float:
    """Seconds per call of ``fn(x, w)``, calling it on every weight copy in `ws`, `rounds` times
    (copies enough to exceed the last-level cache make each call read its weight from DRAM)."""
    t0 = clock()
    for _ in range(rounds):
        for w in ws:
            fn(x, w)
    return (clock() - t0) / (rounds * len(ws))


def bench_rotating(variants: dict, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each variant ``name -> (fn, x, ws, ...)`` (`time_rotating`).

    One warm-up pass (first touch, thread pool), then a number of rounds per variant that makes
    one measurement last about 20 ms, and `repeats` measurements interleaved over the variants:
    short bursts of load from other processes spoil a few samples, which the median drops."""
    rounds = {}
    with torch.inference_mode():
        for name, (fn, x, ws, *_) in variants.items():
            time_rotating(fn, x, ws, 1, clock)
            t = time_rotating(fn, x, ws, 1, clock)
            rounds[name] = max(1, round(0.02 / (t * len(ws))))
        samples = {name: [] for name in variants}
        for _ in range(repeats):
            for name, (fn, x, ws, *_) in variants.items():
                samples[name].append(time_rotating(fn, x, ws, rounds[name], clock))
    return {name: statistics.median(s) for name, s in samples.items()}
