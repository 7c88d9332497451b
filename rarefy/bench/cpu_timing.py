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
