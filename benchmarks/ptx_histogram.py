"""Instruction mix of the compiled Triton sparse kernels (GPU only): where decode time goes.

    PYTHONPATH=. python3 benchmarks/ptx_histogram.py [--dump DIR]

Compiles the bitmap (and BSR) kernel for one config on a small problem, then prints the
PTX opcode histogram of the whole kernel and the instruction count of its main loop.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import torch

from rarefy.formats.sparse_weight import BlockSparse, TiledBitmap
from rarefy.kernels.sparse_matmul.triton_bitmap import BitmapConfig, _bitmap_kernel, bitmap_matmul_triton
from rarefy.kernels.sparse_matmul.triton_bsr import BsrConfig, _bsr_kernel, bsr_matmul_triton


def histogram(ptx: str):
    ops = collections.Counter()
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line.startswith(("//", ".", "{", "}", "$")) or line.endswith(":"):
            continue
        op = re.split(r"[\s;]", line.lstrip("@!%p0123456789 "), maxsplit=1)[0]
        ops[op] += 1
    return ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=os.environ.get("OUT"))
    args = ap.parse_args()
    w = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    w[torch.rand_like(w, dtype=torch.float32) < 0.5] = 0
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    tb = TiledBitmap.from_dense(w)
    bs = BlockSparse.from_dense(w, 32)
    runs = {
        "bitmap_bn1_bk1024_w1": lambda: bitmap_matmul_triton(x, tb.bitmask, tb.values, 256, tile_offsets=tb.tile_offsets,
                                                             config=BitmapConfig(1, 1024, 1, num_warps=1)),
        "bitmap_bn4_bk512_w2": lambda: bitmap_matmul_triton(x, tb.bitmask, tb.values, 256, tile_offsets=tb.tile_offsets,
                                                            config=BitmapConfig(4, 512, 1, num_warps=2)),
        "bsr32_u4_w2": lambda: bsr_matmul_triton(x, bs.row_ptr, bs.col_idx, bs.blocks, 256, config=BsrConfig(4, 1, 1, 2)),
    }
    for name, fn in runs.items():
        fn()
        torch.cuda.synchronize()
    for kern in (_bitmap_kernel, _bsr_kernel):
        for dev_cache in kern.device_caches.values():
            for key, compiled in dev_cache[0].items():
                ptx = compiled.asm["ptx"]
                ops = histogram(ptx)
                total = sum(ops.values())
                print(f"== {kern.fn.__name__} warps={compiled.metadata.num_warps} total={total}")
                print("   " + ", ".join(f"{k}:{v}" for k, v in ops.most_common(25)))
                if args.dump:
                    with open(os.path.join(args.dump, f"{kern.fn.__name__}_{abs(hash(str(key))) % 10**6}.ptx"), "w") as f:
                        f.write(ptx)


if __name__ == "__main__":
    main()
