"""SASS of the ternary dp4a GEMV kernels for an H100 (sm_90), compiled ahead of time on the CPU:
the main loop's instruction mix (loads and their widths, dp4a, logic, shared memory and
barriers) for the "rows" kernel and the earlier one.

    python3 benchmarks/sass_ternary_dp4a.py [--rows 4] [--warps 1] [--n 4096] [--k 4096] [--dump]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def compile_kernel(fn, constexprs: dict, types: dict, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    # what a real launch specialises: pointers, strides and the per-split length (multiples of 16)
    div = [n for n in names if n.endswith("_ptr") or n.startswith("stride") or n == "units_per_split"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div if n not in constexprs}
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def resources(kernel) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of the cubin."""
    import re
    import subprocess
    import tempfile

    from sass_decode_swap import _tool

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def loop_mix(kernel) -> tuple[collections.Counter, int, dict]:
    from sass_decode_swap import instructions, main_loop, sass_of

    ins, labels = instructions(sass_of(kernel.asm["cubin"]))
    body = main_loop(ins, labels)
    mix = collections.Counter(op.split(".")[0] if not op.startswith("LDG") else op for _, op, _ in body)
    whole = collections.Counter(op.split(".")[0] for _, op, _ in ins)
    return mix, len(body), whole


def main(argv=None) -> int:
    from rarefy.kernels.lowbit_gemv import triton_ternary_dp4a as old
    from rarefy.kernels.lowbit_gemv import triton_ternary_dp4a_rows as rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--dump", action="store_true")
    a = ap.parse_args(argv)
    types = dict(xq_ptr="*i32", w_ptr="*i32", s_ptr="*fp32", xs_ptr="*fp32", out_ptr="*fp32", ws_ptr="*fp32",
                 cnt_ptr="*i32")
    common = dict(EVEN=True, PDL=True, ASM=True, PER_ROW=False)
    kr = compile_kernel(rows._ternary_dp4a_rows_kernel,
                        dict(common, BLOCK_N=a.rows * a.warps, LANES=32), types, a.warps)
    ko = compile_kernel(old._ternary_dp4a_kernel, dict(common, SPLIT=False, PREFETCH=False, BLOCK_N=8, BLOCK_U=128),
                        types, 4)
    for name, k, words in (("rows", kr, 128 * a.rows * a.warps), ("old n8 u128 w4", ko, 128 * 8)):
        mix, n, whole = loop_mix(k)
        regs, stack = resources(k)
        print(f"{name}: {n} SASS in the main loop for {words} packed words ({16 * words} weights): "
              f"{n / (16 * words / (32 * (a.warps if name == 'rows' else 4))):.2f} per weight a thread; "
              f"registers {regs}, stack {stack}, shared {k.metadata.shared} B")
        print("   loop:", ", ".join(f"{op} {c}" for op, c in mix.most_common(14)))
        print("   kernel: BAR", whole.get("BAR", 0), "STS", whole.get("STS", 0), "LDS", whole.get("LDS", 0),
              "SHFL", whole.get("SHFL", 0))
        if a.dump and name == "rows":
            from sass_decode_swap import sass_of
            print(sass_of(k.asm["cubin"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
