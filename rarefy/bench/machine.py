"""What machine a benchmark ran on, for the header of its results table."""

import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_copy_bandwidth_tbs(device, nbytes: int | None = None) -> float:
    """Copy bandwidth of `device` in TB/s, read + write: device-to-device on CUDA (1 GiB by
    default), memcpy on the CPU (256 MiB by default) — the roof a kernel's GB/s is judged by."""
    import torch

    if torch.device(device).type == "cuda":
        from rarefy.bench.gpu_timing import copy_bandwidth_tbs

        return copy_bandwidth_tbs(device, nbytes or 2**30)
    from rarefy.bench.cpu_timing import cpu_copy_bandwidth_tbs

    return cpu_copy_bandwidth_tbs(nbytes or 256 * 2**20)
