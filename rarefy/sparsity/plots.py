"""PNG plots of an analysis: |w| histograms per component and layer-similarity heatmaps.

Needs matplotlib (Agg backend: no display). Input is the dict `analyze_checkpoint` returns.
"""

from __future__ import annotations

import os
import re

import numpy as np

from rarefy.errors import RarefyError


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "tensor"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RarefyError("--plots needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(result: dict, out_dir: str) -> list[str]:
    """Write hist_<component>.png per component and sim_<series>.png per series; returns paths."""
    from rarefy.sparsity.analyze import LOG_EDGES
    plt = _pyplot()
    paths = []
    thresholds = result["options"]["thresholds"]
    centers = (LOG_EDGES[:-1] + LOG_EDGES[1:]) / 2
    for name, comp in result["components"].items():
        counts = np.asarray(comp["log_hist"], dtype=np.float64)
        if counts.sum() == 0:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(centers, counts / counts.sum(), width=LOG_EDGES[1] - LOG_EDGES[0], color="#4477aa")
        for t in thresholds:
            ax.axvline(np.log10(t), color="#cc3311", lw=0.8, ls="--")
        ax.axvline(np.log10(max(comp["rms"], 1e-12)), color="#228833", lw=1.0, label="RMS")
        ax.set_xlabel("log10 |w|  (dashed: absolute thresholds)")
        ax.set_ylabel("share of weights")
        ax.set_title(f"{name}: {comp['tensors']} tensors, {comp['params']:,} weights"
                     + (f", {comp['zeros']:.1%} exact zeros" if comp["zeros"] else ""))
        ax.legend(loc="upper left")
        lo = np.nonzero(counts)[0]
        ax.set_xlim(LOG_EDGES[max(lo[0] - 2, 0)], LOG_EDGES[min(lo[-1] + 3, len(LOG_EDGES) - 1)])
        paths.append(_save(fig, plt, os.path.join(out_dir, f"hist_{_safe(name)}.png")))
    for s in result["similarity"]:
        cos = np.array([[np.nan if v is None else v for v in row] for row in s["cosine"]], dtype=np.float64)
        n = len(s["layers"])
        fig, ax = plt.subplots(figsize=(1.5 + 0.22 * n, 1.2 + 0.22 * n) if n > 20 else (6, 5))
        # Scaled to the data: norms sit near 1, projections near 0; the colorbar gives the scale.
        lo = float(np.nanmin(cos)) if np.isfinite(cos).any() else 0.0
        im = ax.imshow(cos, vmin=min(lo, 0.999), vmax=1, cmap="viridis")
        ticks = range(0, n, max(1, n // 16))
        ax.set_xticks(list(ticks), [str(s["layers"][i]) for i in ticks])
        ax.set_yticks(list(ticks), [str(s["layers"][i]) for i in ticks])
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(f"{s['series']}\n({s['mode']})", fontsize=9)
        fig.colorbar(im, ax=ax, label="cosine similarity")
        paths.append(_save(fig, plt, os.path.join(out_dir, f"sim_{_safe(s['series'])}.png")))
    return paths


def _save(fig, plt, path: str) -> str:
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise RarefyError(f"cannot write plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path
