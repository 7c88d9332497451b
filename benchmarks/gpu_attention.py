"""Paged decode attention on the GPU: rarefy's Triton flash-decoding kernel per KV dtype,
against the device copy bandwidth and torch SDPA (the same as `rarefy bench attention`).

    PYTHONPATH=. python3 benchmarks/gpu_attention.py --quick            # the target points (< 1 min on an H100)
    PYTHONPATH=. python3 benchmarks/gpu_attention.py --out attn.md      # contexts 1k-128k x batches 1-64 (< 5 min)
    PYTHONPATH=. python3 benchmarks/gpu_attention.py --quick --sweep    # + plan variants at 32k x 1 and 4k x 32

32 query / 8 KV heads, head_dim 128, block size 16, bf16 query; KV dtypes bf16, fp16,
fp8_e4m3, fp8_e5m2, int8. Each row is checked against rarefy's torch path on the same cache
before it is timed (CUDA-graph replay rotating over cache copies that exceed 4x L2). See
rarefy/bench/attention.py for what is counted and docs/attention-kernels.md for the design.
Needs torch + triton only (no gguf, fastapi or typer).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench import attention as ab  # noqa: E402
from rarefy.errors import RarefyError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32k x 1, 4k x 32, 1k/8k/128k x 1")
    ap.add_argument("--device", default="auto", help="cuda, cpu (torch path, small) or auto")
    ap.add_argument("--contexts", help="comma list, e.g. 1k,4k,32k")
    ap.add_argument("--batches", help="comma list, e.g. 1,8,32")
    ap.add_argument("--kv-dtypes", help="comma list (default: bf16,fp16,fp8_e4m3,fp8_e5m2,int8)")
    ap.add_argument("--sweep", action="store_true", help="also time plan variants at 32k x 1 and 4k x 32")
    ap.add_argument("--sweep-quant", action="store_true",
                    help="sweep only the int8/fp8 variants (conversion path, warps, tile, splits)")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA baseline")
    ap.add_argument("--samples", type=int, default=7, help="timed graph replays per row (median)")
    ap.add_argument("--json", help="also write the full results as JSON to this file")
    ap.add_argument("--out", help="write the results as markdown to this file")
    args = ap.parse_args(argv)

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg = ab.default_config(device, args.quick,
                                command="PYTHONPATH=. python3 benchmarks/gpu_attention.py "
                                + shlex.join(sys.argv[1:] if argv is None else argv))
        if device == "cuda":
            cfg.samples = args.samples
        if args.contexts or args.batches:
            ctxs = ab.parse_ints(args.contexts, "--contexts") if args.contexts else \
                tuple(sorted({c for c, _ in cfg.points}))
            bats = ab.parse_ints(args.batches, "--batches") if args.batches else \
                tuple(sorted({b for _, b in cfg.points}))
            cfg.points = ab.grid_points(ctxs, bats, cfg.max_tokens)
        if args.kv_dtypes:
            cfg.kv_dtypes = ab.parse_dtypes(args.kv_dtypes)
        cfg.sweep = (args.sweep or args.sweep_quant) and device == "cuda"
        cfg.sweep_quant_only = args.sweep_quant and not args.sweep
        cfg.sdpa = not args.no_sdpa
        result = ab.run_bench(cfg, progress=ab._stderr_progress)
    except RarefyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(ab.format_markdown(result))
        print(f"wrote {args.out}", file=sys.stderr)
    print(ab.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
