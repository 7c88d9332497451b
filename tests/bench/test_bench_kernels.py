"""`rarefy bench kernels` on the CPU with tiny shapes: table/JSON/markdown structure, the
correctness gate (a wrong kernel's rows say FAILED and are not timed), the degrade path for
rarefy modules that are not there, and the summary's arithmetic."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rarefy.bench import kernels as kb
from rarefy.cli import app
from rarefy.errors import RarefyError

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_config(**kw) -> kb.BenchConfig:
    base = dict(device="cpu", shapes=(kb.Shape("tiny", 64, 96),), patterns=kb.parse_patterns("50"),
                batches=(1, 3), methods=("dense",), samples=1, cpu_sample_s=0.001,
                copy_bytes=8 * 2**20, max_buffers=4)
    base.update(kw)
    return kb.BenchConfig(**base)


def test_cli_json_table_and_markdown(tmp_path):
    md = tmp_path / "kernels.md"
    r = run("bench", "kernels", "--device", "cpu", "--shapes", "64x96", "--patterns", "50,2:4,b64@50",
            "--batches", "1,2", "--methods", "dense,dense_fp32,csr_fp32", "--samples", 1,
            "--json", "--out", md)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) == {"info", "config", "rows", "summary", "notes", "case_seconds"}
    info = res["info"]
    assert info["copy_tbs"] > 0 and info["dtype"] == "bf16" and info["torch"] == torch.__version__
    assert res["config"]["batches"] == [1, 2] and res["config"]["patterns"] == ["50", "2:4", "b64@50"]

    rows = res["rows"]
    # 2 dense methods x 2 batches, then csr_fp32 x 3 patterns x 2 batches
    assert len(rows) == 4 + 6
    need = {"shape", "n", "k", "pattern", "batch", "method", "label", "status", "us", "mb", "tbs",
            "frac_copy_bw", "speedup_vs_dense", "speedup_vs_rarefy_dense", "rel_err", "note"}
    assert all(need <= set(row) for row in rows)
    dense = [x for x in rows if x["pattern"] == "dense"]
    assert {x["method"] for x in dense} == {"dense", "dense_fp32"} and all(x["status"] == "ok" for x in dense)
    # the dense reference is the faster torch dense row: its speed-up is exactly 1, the other's <= 1
    for m in (1, 2):
        sp = sorted(x["speedup_vs_dense"] for x in dense if x["batch"] == m)
        assert sp[-1] == pytest.approx(1.0) and sp[0] <= 1.0
    for x in rows:
        if x["status"] == "ok":
            assert x["us"] > 0 and x["rel_err"] < 1e-2 and x["tbs"] > 0
            assert x["mb"] == pytest.approx(x["bytes"] / 1e6)
            assert x["tbs"] == pytest.approx(x["bytes"] / (x["us"] * 1e-6) / 1e12)
            assert x["frac_copy_bw"] == pytest.approx(x["tbs"] / info["copy_tbs"])
    csr = {(x["pattern"], x["batch"]): x for x in rows if x["method"] == "csr_fp32"}
    assert csr[("unstr 50%", 1)]["status"] == "ok" and csr[("2:4", 2)]["status"] == "ok"
    assert csr[("block64 50%", 1)]["status"] == "skipped" and "does not divide" in csr[("block64 50%", 1)]["note"]
    assert 0.45 < csr[("unstr 50%", 1)]["density"] < 0.55
    # CSR stores values + indices: more bytes than the half it keeps, fewer than fp32 dense + indices
    assert csr[("unstr 50%", 1)]["bytes"] > 0.5 * 64 * 96 * 4

    s = res["summary"]
    assert "no llama3-8b shapes" in s["scope"]
    ent = {e["pattern"]: e for e in s["entries"] if e["method"] == "csr_fp32"}
    assert set(ent) == {"50", "2:4"} and ent["50"]["batch8"] is None
    assert ent["50"]["batch1"] == pytest.approx(csr[("unstr 50%", 1)]["speedup_vs_dense"])

    out = r.stdout
    for col in ("shape", "pattern", "method", "µs", "MB", "TB/s", "% copy", "vs F.linear", "vs gemv_f16"):
        assert col in out
    assert "Summary: median over" in out and "torch CSR fp32" in out

    text = md.read_text(encoding="utf-8")
    assert text.startswith("# rarefy bench kernels")
    for bit in (f"date: {info['date']}", "device:", f"torch {torch.__version__}", "triton", "copy bandwidth",
                "## Summary", "## All rows", "| shape |"):
        assert bit in text
    assert text.count("\n| tiny") + text.count("\n| 64x96") >= 8


def _prep_wrong(case):
    return kb.Prepared(case.w, lambda w, x: 1.5 * F.linear(x, w), case.w.numel() * 2, lambda w: w.clone())


def _prep_nan(case):
    def call(w, x):
        y = F.linear(x, w)
        y[..., 0] = float("nan")
        return y
    return kb.Prepared(case.w, call, case.w.numel() * 2, lambda w: w.clone())


def _prep_right(case):
    return kb.Prepared(case.w, lambda w, x: F.linear(x, w), case.w.numel() * 2, lambda w: w.clone(),
                       note="injected")


def _prep_unpruned(case):
    """Ignores the pruning: right for dense, wrong for every sparse pattern."""
    return kb.Prepared(case.w, lambda w, x: F.linear(x, (w + 0.05 * (w == 0)).to(w.dtype)), case.w.numel() * 2)


def test_failed_check_marks_row_and_is_not_timed():
    extra = [kb.Method("wrong", "wrong kernel", False, _prep_wrong),
             kb.Method("nan", "nan kernel", False, _prep_nan),
             kb.Method("unpruned", "unpruned kernel", False, _prep_unpruned),
             kb.Method("right", "right kernel", False, _prep_right)]
    res = kb.run_bench(tiny_config(patterns=kb.parse_patterns("50,2:4")), extra_methods=extra)
    rows = {(x["method"], x["pattern"], x["batch"]): x for x in res["rows"]}
    for pat in ("unstr 50%", "2:4"):
        for m in (1, 3):
            bad = rows[("wrong", pat, m)]
            assert bad["status"] == "FAILED" and bad["us"] is None and bad["tbs"] is None
            assert bad["rel_err"] == pytest.approx(0.5, rel=1e-2) and "rel err" in bad["note"]
            nan = rows[("nan", pat, m)]
            assert nan["status"] == "FAILED" and nan["us"] is None and "NaN" in nan["note"]
            assert rows[("unpruned", pat, m)]["status"] == "FAILED"
            ok = rows[("right", pat, m)]
            assert ok["status"] == "ok" and ok["us"] > 0 and ok["speedup_vs_dense"] > 0
            assert ok["rel_err"] < 1e-2 and ok["note"].startswith("injected") and ok["nbuf"] >= 2
    table = kb.format_table(res)
    assert "FAILED" in table and "wrong kernel" in table and "right kernel" in table
    # FAILED rows of one method/pattern with the same note collapse into one line listing their batches
    assert any("nan kernel" in line and " 1,3 " in line and "FAILED: NaN" in line for line in table.splitlines())
    # only timed rows enter the summary
    assert {e["method"] for e in res["summary"]["entries"]} == {"right"}


def test_inaccurate_baseline_is_timed_with_a_note():
    res = kb.run_bench(tiny_config(), extra_methods=[kb.Method("base", "sloppy baseline", False, _prep_wrong,
                                                               gate=False),
                                                     kb.Method("nanbase", "nan baseline", False, _prep_nan,
                                                               gate=False)])
    rows = [x for x in res["rows"] if x["method"] == "base"]
    assert rows and all(x["status"] == "ok" and x["us"] > 0 and x["note"].startswith("INACCURATE") for x in rows)
    assert all(x["status"] == "FAILED" for x in res["rows"] if x["method"] == "nanbase")


def test_rarefy_rows_degrade_when_the_compiler_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "rarefy.sparse_compiler", None)  # import fails
    res = kb.run_bench(tiny_config(methods=("rarefy",), batches=(1,)))
    rows = res["rows"]
    assert rows and all(x["status"] == "unavailable" and x["method"] == "rarefy" for x in rows)
    assert "rarefy.sparse_compiler" in rows[0]["note"] and "rarefy" in res["notes"]
    assert "unavailable" in kb.format_table(res)


def test_copies_that_fail_the_check_are_not_rotated():
    def prep(case):
        return kb.Prepared(case.w, lambda w, x: F.linear(x, w), case.w.numel() * 2,
                           copy=lambda w: torch.zeros_like(w), note="bad copies")
    res = kb.run_bench(tiny_config(methods=("dense",), max_buffers=8),
                       extra_methods=[kb.Method("badcopy", "bad copy", False, prep)])
    r = [x for x in res["rows"] if x["method"] == "badcopy"]
    assert all(x["status"] == "ok" and x["nbuf"] == 1 and "rotating over 1 of" in x["note"] for x in r)


def test_a_crashing_baseline_does_not_stop_the_sweep():
    def boom(case):
        raise RuntimeError("kaboom")
    res = kb.run_bench(tiny_config(), extra_methods=[kb.Method("boom", "boom", False, boom),
                                                     kb.Method("right", "right", False, _prep_right)])
    st = {x["method"]: x["status"] for x in res["rows"]}
    assert st == {"dense": "ok", "boom": "error", "right": "ok"}


def test_parsers():
    ps = kb.parse_patterns("50,90%,2:4,4:8,b16@75,b32")
    assert [p.label for p in ps] == ["unstr 50%", "unstr 90%", "2:4", "4:8", "block16 75%", "block32 50%"]
    assert [p.spec for p in ps] == ["50", "90", "2:4", "4:8", "b16@75", "b32@50"]
    assert [p.format for p in ps] == ["bitmap", "bitmap", "nm", "nm", "bsr", "bsr"]
    assert len(kb.parse_patterns(kb.DEFAULT_PATTERNS)) == 12
    for bad in ("0", "100", "5:3", "2:5", "b0@50", "x", ""):
        with pytest.raises(RarefyError):
            kb.parse_patterns(bad)
    assert kb.parse_shapes("llama3-8b") == kb.LLAMA3_8B_SHAPES
    assert [s.dims for s in kb.parse_shapes("4096x4096,64x96,4096x4096")] == ["4096x4096", "64x96"]
    assert kb.parse_shapes("4096x14336")[0].name == "llama3-8b down"
    for bad in ("64x", "ax3", "0x5", ""):
        with pytest.raises(RarefyError):
            kb.parse_shapes(bad)
    assert kb.parse_batches("8,1,8") == (1, 8)
    gpu = kb.default_config("cuda")
    assert len(gpu.shapes) == 8 and gpu.batches == (1, 2, 4, 8, 16, 32) and len(gpu.patterns) == 12
    quick = kb.default_config("cuda", quick=True)
    assert quick.shapes == kb.LLAMA3_8B_SHAPES and quick.batches == (1, 8)
    assert kb.default_config("cpu").shapes == kb.SMOLLM2_SHAPES and kb.default_config("cpu").batches == (1, 4)


def test_masks_give_the_pattern():
    w = torch.randn(64, 128)
    for spec, density in (("75", 0.25), ("2:4", 0.5), ("b16@75", 0.25)):
        p = kb.parse_patterns(spec)[0]
        keep = p.keep_mask(w.abs())
        assert keep.float().mean().item() == pytest.approx(density, abs=1e-6)
        sw = p.to_format(w.masked_fill(~keep, 0))
        assert torch.equal(sw.to_dense(), w.masked_fill(~keep, 0))


def _row(shape, n, k, pattern, m, sp, sp2=None, method="rarefy", status="ok"):
    return dict(shape=shape, n=n, k=k, pattern=pattern, pattern_spec=pattern, pattern_kind="unstructured",
                batch=m, method=method, label=method, status=status, us=1.0,
                speedup_vs_dense=sp, speedup_vs_rarefy_dense=sp2)


def test_summary_medians_over_the_8b_shapes():
    shapes = [(s.name, s.n, s.k) for s in kb.LLAMA3_8B_SHAPES]
    b1 = [1.2, 1.6, 1.4, 2.0]
    b8 = [0.6, 1.6, 0.7, 1.0]
    rows = []
    for (name, n, k), s1, s8 in zip(shapes, b1, b8):
        rows += [_row(name, n, k, "50", 1, s1, s1 / 2), _row(name, n, k, "50", 8, s8)]
    rows.append(_row("qwen3.5-27b down", 5120, 17408, "50", 1, 100.0))  # not an 8B shape: ignored
    rows.append(_row(shapes[0][0], shapes[0][1], shapes[0][2], "75", 1, None, status="FAILED"))
    s = kb.summarize(rows, kb.BenchConfig(dtype=torch.bfloat16))
    assert "4 llama3-8b shapes" in s["scope"]
    (e,) = s["entries"]
    assert e["pattern"] == "50" and e["shapes"] == 4
    assert e["batch1"] == pytest.approx(statistics.median(b1))
    assert e["batch8"] == pytest.approx(statistics.median(b8))
    assert e["batch8_over_batch1"] == pytest.approx(statistics.median([a / b for a, b in zip(b8, b1)]))
    assert e["batch1_vs_rarefy_dense"] == pytest.approx(statistics.median(b1) / 2)


def test_cli_bad_input():
    for args, frag in ((("--shapes", "64x"), "--shapes"), (("--patterns", "5:3"), "--patterns"),
                       (("--batches", "0"), "--batches"), (("--dtype", "int8"), "--dtype"),
                       (("--methods", "semi24"), "--methods")):
        r = run("bench", "kernels", "--device", "cpu", *args)
        assert r.exit_code != 0 and frag in r.output, r.output
        assert "Traceback" not in r.output
    if not torch.cuda.is_available():
        r = run("bench", "kernels", "--device", "cuda")
        assert r.exit_code != 0 and "no CUDA device" in r.output


@pytest.mark.gpu
def test_gpu_smoke():
    """On a GPU: every baseline runs or says why not; nothing crashes; the dense rows are timed."""
    cfg = kb.default_config("cuda", samples=2, patterns=kb.parse_patterns("50,2:4,b32@50"), batches=(1, 8))
    cfg.shapes = (kb.Shape("small", 1024, 2048),)
    res = kb.run_bench(cfg)
    st = {(x["method"], x["pattern"], x["batch"]): x["status"] for x in res["rows"]}
    assert st[("dense", "dense", 1)] == "ok" and st[("dense", "dense", 8)] == "ok"
    assert all(v in ("ok", "unsupported", "unavailable", "FAILED", "error") for v in st.values())
    assert ("semi24", "2:4", 1) in st and ("semi24", "unstr 50%", 1) not in st
    assert res["info"]["copy_tbs"] > 0.5
