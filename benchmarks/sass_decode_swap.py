"""SASS of the 8-bit paged decode kernel for an H100 (sm_90), compiled ahead of time on the CPU.

    python3 benchmarks/sass_decode_swap.py [--kv int8,fp8_e4m3] [--ctx 32768] [--batch 1]
        [--plan key=value ...] [--dump DIR]

No GPU needed: Triton's bundled ptxas/nvdisasm build and disassemble the kernel that
``plan_decode`` would launch on an H100 (132 SMs), and the script prints, per KV dtype, the
registers, the local memory (stack), the shared memory, the instruction count of the main loop (the largest block that
ends in a backward branch) and its opcode histogram. The device time is the only measure of
speed; this shows *why* one variant issues more than another before spending device time.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_swap(kv_dtype: str, ctx: int, batch: int, plan_kw: dict, pdl: bool = True):
    """The compiled kernel (triton CompiledKernel) for this point's plan, for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rarefy.kernels.paged_attention import triton_decode as td
    from rarefy.kernels.paged_attention import triton_decode_warpsplit as tw
    from rarefy.kernels.paged_attention.plan import plan_decode

    p = plan_decode(batch, ctx, 32, 8, 128, kv_dtype, 16, 132, v_dim_major=True, **plan_kw)
    prefetch = p.prefetch_pages if pdl else 0
    if p.kernel != "swap":
        raise SystemExit(f"{kv_dtype}: plan {p.describe()} is not the swap kernel")
    ptr = {"int8": "*i8", "fp8_e4m3": "*fp8e4nv", "fp8_e5m2": "*fp8e5", "bf16": "*bf16", "fp16": "*fp16"}[kv_dtype]
    quant = kv_dtype in ("int8", "fp8_e4m3", "fp8_e5m2")
    elem = 1 if quant else 2
    types = dict(q_ptr="*bf16", k_ptr=ptr, v_ptr=ptr, ks_ptr="*fp16" if quant else ptr,
                 vs_ptr="*fp16" if quant else ptr, bt_ptr="*i32", sl_ptr="*i32",
                 out_ptr="*bf16", po_ptr="*fp32", plse_ptr="*fp32", cnt_ptr="*i32", qk_scale="fp32")
    conv = td.conv_code(p, kv_dtype)
    fused = p.fused_reduce
    cx = dict(GROUP=p.group, GROUP_PAD=p.group_pad, HEAD_DIM=128, BLOCK_SIZE=16, SUB=p.num_warps,
              SUB_N=p.tile_n // p.num_warps, SPLIT=p.num_splits > 1, FUSED=fused, QUANT=quant,
              DOT={"bf16": 1, "fp16": 2}[p.dot_dtype], CHUNK=min(64, max(8, 1 << (max(1, p.num_splits) - 1).bit_length())), CONV=conv,
              KV_MUL=256.0 if conv in (2, 3) else 1.0, V_DIM_MAJOR=True,
              V_FINITE=kv_dtype == "int8" or conv == 2, PDL_WAIT=pdl, PDL=pdl and p.num_splits > 1 and not fused,
              K_BIAS=p.convert in ("bias_k", "bias", "bias_u8"), V_BIAS=p.convert in ("bias", "bias_u8"), ASM=True,
              OFFSET=p.convert == "bias_u8", PREFETCH=prefetch,
              PAGE_LINES=16 * 128 * elem // 128 if prefetch else 1, LINE_ELEMS=128 // elem if prefetch else 1,
              stride_vt=1)  # dim-major V: Triton specialises the unit token stride
    names = tw._decode_swap_kernel.arg_names
    sig = {n: "constexpr" if n in cx else types.get(n, "i32") for n in names}
    div = [n for n in names if n.endswith("_ptr") or (n.startswith("stride") and n not in cx and n != "stride_btb")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div}
    opts = dict(num_warps=p.num_warps, num_stages=p.num_stages)
    if p.max_regs:
        opts["maxnreg"] = p.max_regs
    k = triton.compile(ASTSource(tw._decode_swap_kernel, sig, cx, attrs), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    return p, k


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", "-hex", f.name], capture_output=True, text=True,
                              check=True).stdout


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def instructions(sass: str) -> tuple[list[tuple[int, str, str]], dict[str, int]]:
    """(address, opcode with modifiers, operands) for every instruction, and label addresses."""
    out, labels, pending = [], {}, []
    for line in sass.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            out.append((addr, m.group(3), m.group(4).strip()))
    return out, labels


def main_loop(ins: list[tuple[int, str, str]], labels: dict[str, int]) -> list[tuple[int, str, str]]:
    """The instructions of the largest backward-branch range (the main loop)."""
    best = []
    for addr, op, args in ins:
        if op.startswith("BRA"):
            m = re.search(r"(\.L_x_\d+)", args)
            if m and labels.get(m.group(1), addr + 1) < addr:
                start = labels[m.group(1)]
                body = [i for i in ins if start <= i[0] <= addr]
                if len(body) > len(best):
                    best = body
    return best


def report(kv_dtype: str, ctx: int = 32768, batch: int = 1, plan_kw: dict | None = None) -> dict:
    """Registers, stack (local memory), shared memory, instruction counts and the main loop's
    opcode histogram of the sm_90 build of this point's default (or overridden) plan."""
    p, k = compile_swap(kv_dtype, ctx, batch, plan_kw or {})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    sass = sass_of(k.asm["cubin"])
    ins, labels = instructions(sass)
    loop = main_loop(ins, labels)
    return dict(plan=p.describe(), regs=int(regs.group(1)) if regs else None,
                stack=int(stack.group(1)) if stack else None, shared=k.metadata.shared, instructions=len(ins),
                loop=len(loop), loop_ops=dict(collections.Counter(op.split(".")[0] for _, op, _ in loop)),
                ops=dict(collections.Counter(op.split(".")[0] for _, op, _ in ins)), sass=sass, ttgir=k.asm["ttgir"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv", default="int8,fp8_e4m3")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--plan", nargs="*", default=[], help="plan_decode overrides, key=value (ints or names)")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--dump", default=None, help="write each kernel's SASS and TTGIR here")
    a = ap.parse_args()
    kw = {}
    for item in a.plan:
        key, _, val = item.partition("=")
        kw[key] = int(val) if val.lstrip("-").isdigit() else val
    for kv in a.kv.split(","):
        r = report(kv, a.ctx, a.batch, kw)
        hist = collections.Counter(r["loop_ops"])
        print(f"== {kv}: {r['plan']}")
        print(f"   regs {r['regs']}, stack {r['stack']} B, shared {r['shared']} B, {r['instructions']} instructions, "
              f"main loop {r['loop']}")
        print("   loop: " + ", ".join(f"{o}:{c}" for o, c in hist.most_common(a.top)))
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            for ext in ("sass", "ttgir"):
                with open(os.path.join(a.dump, f"swap_{kv}.{ext}"), "w") as f:
                    f.write(r[ext])
    return 0


if __name__ == "__main__":
    sys.exit(main())
