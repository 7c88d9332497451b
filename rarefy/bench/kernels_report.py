"""`rarefy bench kernels`: the summary (medians of the speed-ups) and the text table, markdown
and progress-line formatting of a result."""

from __future__ import annotations

import statistics
import sys
from typing import TYPE_CHECKING

from .kernel_cases import SUMMARY_PREFIX
from .kernel_methods import _dt

if TYPE_CHECKING:
    from .kernels import BenchConfig

# ------------------------------------------------------------------------------ summary

SUMMARY_PATTERNS = ("50", "75", "90", "2:4")


def summarize(rows: list[dict], cfg: BenchConfig) -> dict:
    """The issue's figures: medians over the Llama-3-8B shapes of the speed-up at batch 1
    (50/75/90% unstructured, 2:4) and of batch-8 speed-up / batch-1 speed-up, per method."""
    ok = [r for r in rows if r["status"] == "ok" and r["pattern_kind"] != "dense"]
    shapes = sorted({(r["n"], r["k"]) for r in ok if r["shape"].startswith(SUMMARY_PREFIX)})
    scope = f"the {len(shapes)} {SUMMARY_PREFIX} shapes"
    if not shapes:
        shapes = sorted({(r["n"], r["k"]) for r in ok})
        scope = f"all {len(shapes)} benchmarked shapes (no {SUMMARY_PREFIX} shapes in this run)"
    methods = list(dict.fromkeys(r["method"] for r in ok))
    labels = {r["method"]: r["label"] for r in ok}
    entries = []
    for key in methods:
        for spec in SUMMARY_PATTERNS:
            sel = {(r["n"], r["k"], r["batch"]): r for r in ok if r["method"] == key and r["pattern_spec"] == spec
                   and (r["n"], r["k"]) in shapes}
            if not sel:
                continue
            e = {"method": key, "label": labels[key], "pattern": spec, "shapes": 0}
            for col in ("speedup_vs_dense", "speedup_vs_rarefy_dense"):
                s1 = {s: sel[s + (1,)][col] for s in shapes if s + (1,) in sel and sel[s + (1,)][col]}
                s8 = {s: sel[s + (8,)][col] for s in shapes if s + (8,) in sel and sel[s + (8,)][col]}
                ratio = [s8[s] / s1[s] for s in s1 if s in s8]
                suffix = "" if col == "speedup_vs_dense" else "_vs_rarefy_dense"
                e["batch1" + suffix] = statistics.median(s1.values()) if s1 else None
                e["batch8" + suffix] = statistics.median(s8.values()) if s8 else None
                e["batch8_over_batch1" + suffix] = statistics.median(ratio) if ratio else None
                if col == "speedup_vs_dense":
                    e["shapes"] = len(s1)
            entries.append(e)
    return {"scope": scope, "dtype": _dt(cfg.dtype), "shapes": [f"{n}x{k}" for n, k in shapes],
            "entries": entries}


# ----------------------------------------------------------------------------- printing

_COLS = ("shape", "N x K", "pattern", "M", "method", "µs", "MB", "TB/s", "% copy", "vs dense", "vs r-dense",
         "status / note")


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def _cells(r: dict, batches: str) -> list[str]:
    note = r["status"] if r["status"] != "ok" else ""
    if r["note"]:
        note = f"{note}: {r['note']}" if note else r["note"]
    if r["status"] == "ok" and r.get("timing") and r["timing"] != "cuda graph" and r["timing"] != "wall clock":
        note = f"{note}; {r['timing']}" if note else r["timing"]
    return [r["shape"], f"{r['n']}x{r['k']}", r["pattern"], batches, r["label"], _f(r["us"], ".1f"),
            _f(r["mb"], ".2f"), _f(r["tbs"], ".3f" if (r["tbs"] or 1) < 0.1 else ".2f"),
            _f(r["frac_copy_bw"] and 100 * r["frac_copy_bw"], ".0f"),
            _f(r["speedup_vs_dense"], ".2f") + ("x" if r["speedup_vs_dense"] else ""),
            _f(r["speedup_vs_rarefy_dense"], ".2f") + ("x" if r["speedup_vs_rarefy_dense"] else ""), note]


def _collapsed(rows: list[dict]) -> list[list[str]]:
    """Table cells; consecutive non-ok rows of one (shape, pattern, method) with the same note
    become one line listing their batches."""
    out, i = [], 0
    while i < len(rows):
        r, j = rows[i], i + 1
        if r["status"] != "ok":
            while (j < len(rows) and rows[j]["status"] == r["status"] and rows[j]["note"] == r["note"]
                   and all(rows[j][c] == r[c] for c in ("shape", "n", "k", "pattern", "method"))):
                j += 1
        out.append(_cells(r, ",".join(str(x["batch"]) for x in rows[i:j])))
        i = j
    return out


def format_table(result: dict) -> str:
    info, cuda = result["info"], result["config"]["device"] == "cuda"
    cols = list(_COLS)
    cols[9], cols[10] = ("vs cuBLAS", "vs Triton") if cuda else ("vs F.linear", "vs gemv_f16")
    cells = _collapsed(result["rows"])
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols[:-1])]
    right = {3, 5, 6, 7, 8, 9, 10}

    def line(vals):
        return "  ".join((v.rjust(w) if i in right else v.ljust(w)) for i, (v, w) in enumerate(zip(vals, widths))) \
            + "  " + vals[-1]

    out = [f"rarefy bench kernels: {info['device']}, {info['dtype']}, torch {info['torch']}"
           + (f", triton {info['triton']}" if info.get("triton") else "")
           + f"; copy bandwidth {info['copy_tbs']:.2f} TB/s (read + write); {info['seconds']:.0f} s",
           f"dense reference: {info['dense_reference']}; second reference: {info['rarefy_dense_reference']}",
           "", line(cols), line(["-" * w for w in widths] + ["-" * 13])]
    prev = None
    for row in cells:
        if prev is not None and row[0] != prev:
            out.append("")
        prev = row[0]
        out.append(line(row).rstrip())
    out += ["", *format_summary(result)]
    if result["notes"]:
        out += ["", "notes:"] + [f"  {k}: {v}" for k, v in result["notes"].items()]
    return "\n".join(out)


def format_summary(result: dict) -> list[str]:
    s, cuda = result["summary"], result["config"]["device"] == "cuda"
    ref, ref2 = ("cuBLAS", "Triton gemv") if cuda else ("F.linear", "gemv_f16")
    out = [f"Summary: median over {s['scope']}, {s['dtype']}; speed-up vs {ref} dense (vs rarefy's {ref2} "
           "in brackets); b8/b1 = median over shapes of (batch-8 speed-up / batch-1 speed-up)"]
    if not s["entries"]:
        return out + ["  (no timed sparse rows at the summary patterns " + ", ".join(SUMMARY_PATTERNS) + ")"]
    w = max(len(e["label"]) for e in s["entries"])
    out.append(f"  {'method':<{w}}  {'pattern':<9}{'shapes':>7}  {'batch 1':>17}  {'batch 8':>17}  {'b8/b1':>12}")
    for e in s["entries"]:
        pat = e["pattern"] if ":" in e["pattern"] else f"unstr {e['pattern']}%"

        def pair(a, b, unit="x"):
            return f"{_f(a, '.2f')}{unit if a is not None else ''} ({_f(b, '.2f')}{unit if b is not None else ''})"

        out.append(f"  {e['label']:<{w}}  {pat:<9}{e['shapes']:>7}  "
                   f"{pair(e['batch1'], e['batch1_vs_rarefy_dense']):>17}  "
                   f"{pair(e['batch8'], e['batch8_vs_rarefy_dense']):>17}  "
                   f"{pair(e['batch8_over_batch1'], e['batch8_over_batch1_vs_rarefy_dense'], ''):>12}")
    return out


def format_markdown(result: dict) -> str:
    info, cfg, cuda = result["info"], result["config"], result["config"]["device"] == "cuda"
    ref, ref2 = ("cuBLAS", "rarefy Triton") if cuda else ("F.linear", "rarefy gemv_f16")
    timing = ("CUDA-graph replay of back-to-back launches, rotating over weight copies totalling >= 4x L2 "
              f"({info['cache_bytes'] / 2**20:.0f} MiB), median of {cfg['samples']} replays; do_bench (clean L2) "
              "where a launch cannot be captured" if cuda else
              "wall clock of back-to-back calls rotating over weight copies (>= 2x the last-level cache, at most "
              f"256 copies), median of {cfg['samples']} bursts")
    out = ["# rarefy bench kernels", "",
           f"- date: {info['date']}",
           f"- device: {info['device']}" + (f" ({info.get('sms')} SMs, CUDA {info.get('cuda')})" if cuda else ""),
           f"- torch {info['torch']}, triton {info.get('triton') or 'n/a'}, python {info['python']}",
           f"- copy bandwidth: {info['copy_tbs']:.2f} TB/s (device-to-device copy, read + write)",
           f"- dtype: {info['dtype']}; weights: random normal, magnitude-pruned to the pattern",
           f"- patterns: {', '.join(cfg['patterns'])} (`b16@50`: 16x16 blocks, 50% of blocks removed)",
           f"- batches: {', '.join(map(str, cfg['batches']))}; run took {info['seconds']:.0f} s",
           f"- timing: {timing}",
           "- bytes: the weight as stored (values + metadata; rarefy: the sparse format's `nbytes`) + x + out; "
           f"% copy = achieved TB/s / copy bandwidth; speed-ups: {ref} dense time / time, {ref2} dense time / time",
           "- every row is checked first against a float64 reference (rel err < "
           f"{cfg['tol']:g}, no NaN); FAILED rows are not timed",
           f"- command: `{cfg['command'] or 'run_bench(...)'}`", "",
           "## Summary", "", "```", *format_summary(result), "```", ""]
    if result["notes"]:
        out += ["## Notes", ""] + [f"- {k}: {v}" for k, v in result["notes"].items()] + [""]
    cols = list(_COLS)
    cols[9], cols[10] = f"vs {ref}", f"vs {ref2}"
    out += ["## All rows", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in _collapsed(result["rows"]):
        out.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(out) + "\n"


def format_progress(r: dict) -> str:
    return (f"[bench] {r['shape']} {r['n']}x{r['k']} {r['pattern']} M={r['batch']} {r['label']}: "
            + (f"{r['us']:.1f} us, {r['tbs']:.2f} TB/s, x{_f(r['speedup_vs_dense'], '.2f')} vs dense"
               if r["status"] == "ok" else f"{r['status']} {r['note']}"))


def _stderr_progress(r: dict) -> None:
    print(format_progress(r), file=sys.stderr, flush=True)
