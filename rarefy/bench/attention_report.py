"""Text and markdown reports of ``rarefy bench attention`` results (rarefy/bench/attention.py
makes the results: rows, plans, sweep, targets)."""

from __future__ import annotations

import shlex
import sys


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _ctx(c: int) -> str:
    return f"{c // 1024}k" if c % 1024 == 0 else str(c)


COLS = ("kv", "ctx", "batch", "µs", "MB", "TB/s", "% copy", "vs bf16", "SDPA µs", "SDPA/ours", "splits", "check")


def _cells(r: dict) -> list[str]:
    plan = r.get("plan") or {}
    status = r["check"] if r["status"] == "ok" else r["status"] + (f": {r['check']}" if r["check"] else "")
    if r["note"]:
        status += f" ({r['note']})"
    return [r["kv_dtype"], _ctx(r["ctx"]), str(r["batch"]), _f(r["us"], ".1f"), _f(r["mb"], ".1f"),
            _f(r["tbs"], ".2f"), _f(None if r["frac_copy"] is None else 100 * r["frac_copy"], ".0f"),
            _f(r["vs_bf16"], ".2f"), _f(r["sdpa_us"], ".1f"), _f(r["sdpa_ratio"], ".2f"),
            str(plan.get("num_splits", "-")), status or "-"]


def _table(cols, cells, right) -> list[str]:
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

    def line(vals):
        cells = (v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
        return "  ".join(cells).rstrip()

    return [line(cols), line(["-" * w for w in widths])] + [line(c) for c in cells]


def header(result: dict) -> str:
    info, cfg = result["info"], result["config"]
    return (f"rarefy bench attention: {info['device']}, torch {info['torch']}"
            + (f", triton {info['triton']}" if info.get("triton") else "")
            + f"; {cfg['num_heads']} q / {cfg['num_kv_heads']} kv heads, D {cfg['head_dim']},"
            f" block {cfg['block_size']}, {cfg['q_dtype']} query;"
            f" copy bandwidth {info['copy_tbs']:.2f} TB/s (read + write);"
            f" {info['seconds']:.0f} s")


def format_targets(result: dict) -> list[str]:
    cells = []
    for t in result["targets"]:
        met = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        cells.append([t["target"], t["shown"], met])
    return _table(("target", "measured", ""), cells, {1}) if cells else []


def format_sweep(result: dict) -> list[str]:
    if not result["sweep"]:
        return []
    cells = [[r["kv_dtype"], _ctx(r["ctx"]), str(r["batch"]), r["variant"], _f(r["us"], ".1f"),
              _f(None if r["frac_copy"] is None else 100 * r["frac_copy"], ".0f"), r["plan_str"] or "-", r["note"]]
             for r in result["sweep"]]
    out = ["plan sweep (one change at a time from the default):"]
    out += _table(("kv", "ctx", "batch", "variant", "µs", "% copy", "plan", "note"), cells, {1, 2, 4, 5})
    best = {}
    for r in result["sweep"]:
        key = (r["kv_dtype"], r["ctx"], r["batch"])
        if r["us"] and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    out += [""] + [f"best {k[0]} {_ctx(k[1])}x{k[2]}: {r['variant']} {r['us']:.1f} µs ({r['plan_str']})"
                   for k, r in best.items()]
    return out


def format_table(result: dict) -> str:
    """The full table, plans, sweep, then the short targets table last."""
    out = [header(result), ""]
    out += _table(COLS, [_cells(r) for r in result["rows"]], {1, 2, 3, 4, 5, 6, 7, 8, 9, 10})
    plans = {}
    for r in result["rows"]:
        if r.get("plan_str") and r["plan_str"] != "torch":
            smem = f", smem actual {r['smem_actual'] // 1024} KiB" if r.get("smem_actual") else ""
            regs = f", {r['regs']} regs" if r.get("regs") else ""
            spills = f", {r['spills']} spills" if r.get("spills") else ""
            plans[(r["kv_dtype"], r["ctx"], r["batch"])] = r["plan_str"] + smem + regs + spills
    if plans:
        out += ["", "plans:"] + [f"  {k[0]} {_ctx(k[1])}x{k[2]}: {v}" for k, v in plans.items()]
    sweep = format_sweep(result)
    if sweep:
        out += [""] + sweep
    if result["notes"]:
        out += ["", "notes:"] + [f"  {k}: {v}" for k, v in result["notes"].items()]
    tgt = format_targets(result)
    if tgt:
        out += [""] + tgt
    return "\n".join(out)


def format_markdown(result: dict) -> str:
    def md(cols, cells):
        return [("| " + " | ".join(cols) + " |"), "|" + "|".join("---" for _ in cols) + "|"] + \
            ["| " + " | ".join(c) + " |" for c in cells]

    cfg = result["config"]
    out = ["# Paged decode attention", "", header(result), "", f"Command: `{cfg['command']}`", ""]
    out += md(COLS, [_cells(r) for r in result["rows"]])
    if result["targets"]:
        out += ["", "## Targets", ""]
        out += md(("target", "measured", ""), [[t["target"], t["shown"], {True: "met", False: "MISSED", None: "-"}[
            t["met"]]] for t in result["targets"]])
    sweep = format_sweep(result)
    if sweep:
        out += ["", "## Plan sweep", "", "```", *sweep, "```"]
    plans = [f"- {r['kv_dtype']} {_ctx(r['ctx'])}x{r['batch']}: {r['plan_str']}" for r in result["rows"]
             if r.get("plan_str") and r["plan_str"] != "torch"]
    if plans:
        out += ["", "## Plans", ""] + plans
    return "\n".join(out) + "\n"


def format_progress(r: dict) -> str:
    c = _cells(r)
    return (f"[attention] {c[0]} ctx {c[1]} batch {c[2]}: {c[3]} µs, {c[5]} TB/s ({c[6]}% copy), "
            f"SDPA {c[8]} µs; {c[11]} [{r['seconds']:.1f} s]")


def _stderr_progress(r: dict) -> None:
    print(format_progress(r), file=sys.stderr, flush=True)


def command_line(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return "rarefy " + shlex.join(argv) if argv else "rarefy bench attention"



def ab_table(rows: list[dict], key: str, base: str) -> list[str]:
    """The A/B table of the attention probe scripts (benchmarks/gpu_attention_warpsplit.py,
    gpu_kv_layout_probe.py): rows {kvd, ctx, batch, <key>, us, err, note}; "vs base" against the
    same KV dtype's ``base`` row at that point, "vs bf16" against bf16's ``base`` row."""
    cells = []
    for pt in sorted({(r["ctx"], r["batch"]) for r in rows}):
        at = [r for r in rows if (r["ctx"], r["batch"]) == pt]
        bf = next((r["us"] for r in at if r["kvd"] == "bf16" and r[key] == base and r["us"]), None)
        for r in at:
            ref = next((x["us"] for x in at if x["kvd"] == r["kvd"] and x[key] == base and x["us"]), None)
            cells.append([r["kvd"], f"{_ctx(r['ctx'])} x{r['batch']}", r[key], _f(r["us"], ".1f"),
                          f"{ref / r['us']:.2f}x" if ref and r["us"] else "-",
                          f"{bf / r['us']:.2f}x" if bf and r["us"] else "-", f"{r['err'] or 0:.1e}", r["note"]])
    return _table(("kv", "point", key, "µs", "vs " + base, "vs bf16", "rel err", "note"), cells, right={3, 4, 5})


def ab_progress(r: dict, key: str) -> str:
    """One probe row as it finishes (stderr progress line)."""
    us = _f(r["us"], ".1f")
    return (f"{r['kvd']:8s} {_ctx(r['ctx'])} x{r['batch']:<3d} {r[key]:18s} {us:>7s} µs  err {r['err'] or 0:.1e} "
            f"{r['note']}")


def ab_finish(rows: list[dict], key: str, base: str, device_name: str, json_path: str | None = None) -> None:
    """Write the probe's rows as JSON (when asked) and print its A/B table."""
    import json

    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=device_name, rows=rows), f, indent=1)
    print(f"\n{device_name}; vs bf16 = bf16 '{base}' µs / this µs at the same point")
    print("\n".join(ab_table(rows, key, base)))
