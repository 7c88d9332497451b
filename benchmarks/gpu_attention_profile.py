"""Launch the paged decode kernel once per (KV dtype, plan variant) at 32k x 1 so a profiler
(Nsight Compute) can attribute its time: warp stall reasons, achieved bandwidth, occupancy.

    PYTHONPATH=. ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        -k regex:_decode python3 benchmarks/gpu_attention_profile.py [--ctx 32768] [--batch 1]

Each launch is preceded by a warm-up launch (compilation) that the profiler also records;
variants are printed in launch order so the report's kernel instances can be matched.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {  # the dispatcher's plans over dim-major V (the paged cache's layout on GPUs)
    "bf16 default": ("bf16", {}),
    "int8 default": ("int8", {}),
    "fp8_e4m3 default": ("fp8_e4m3", {}),
    "int8 s64": ("int8", dict(num_splits=64)),
    "bf16 base": ("bf16", dict(kernel="base")),
}


def main(argv=None) -> int:
    import torch

    from rarefy.bench.attention import AttnBenchConfig, _Case
    from rarefy.kernels.paged_attention.plan import plan_decode
    from rarefy.kernels.paged_attention.triton_decode import paged_decode_attention_triton, sm_count_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    a = ap.parse_args(argv)
    cfg = AttnBenchConfig(device="cuda")
    dev = torch.device("cuda")
    for name in a.variants.split(","):
        kvd, kw = VARIANTS[name]
        case = _Case(cfg, a.ctx, a.batch, kvd, 1, dev)
        plan = plan_decode(a.batch, a.ctx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kvd, cfg.block_size,
                           sm_count_of(dev), v_dim_major=True, **kw)
        for _ in range(2):  # warm-up (compile), then the measured launch
            paged_decode_attention_triton(*case.args(0), case.sm_scale, plan=plan)
        torch.cuda.synchronize()
        print(f"{name}: {plan.describe()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
