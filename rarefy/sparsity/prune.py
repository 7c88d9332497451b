"""Pruning methods (magnitude, Wanda, SparseGPT), what to prune, and `prune_model`.

Methods, per weight matrix W [out, in]:
- magnitude: score |W|; unstructured comparison group = the whole matrix.
- wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
  Language Models"): score |W_ij| * ||X_j||_2 over the calibration tokens;
  unstructured comparison group = each output row, as in the paper.
- sparsegpt (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
  Be Accurately Pruned in One-Shot"): OBS reconstruction with H = 2 X^T X / N,
  see `sparsegpt_prune`.

What is pruned: every linear of every decoder layer (q/k/v/o_proj,
gate/up/down_proj and any other linear a layer has). The embeddings and lm_head
are never pruned: lm_head is often tied to the embedding matrix, and both are
the most pruning-sensitive matrices in the papers above, which leave them dense.
Per-component sparsity specs and `skip` fnmatch patterns (on HF module names,
e.g. "model.layers.0.*") narrow that down; see `parse_sparsity_spec`.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from rarefy.errors import RarefyError
from rarefy.layers.linear import DenseLinear
from rarefy.sparsity.masks import (Pattern, lowest_k, block_scores, budget, check_sparsity,
                                   expand_blocks, keep_mask, parse_block, parse_pattern)

METHODS = ("magnitude", "wanda", "sparsegpt")
GROUPS = {"attn": ".self_attn.", "mlp": ".mlp."}  # group key -> substring of the module name


# ----------------------------------------------------------------------------- what to prune

def parse_sparsity_spec(spec) -> dict[str, float]:
    """Sparsity spec -> {key: sparsity}.

    Accepted: a float (0.5), a string "0.5", "mlp=0.6,attn=0.4",
    "q_proj=0.5,down_proj=0.7", or a mix with a bare default "0.5,down_proj=0.7";
    or a dict. Keys: "default", a group ("attn", "mlp") or a component name (the
    module's last name, e.g. "q_proj"). A component name beats its group, a
    group beats the default; a linear matched by none stays dense.
    """
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, (int, float)):
        items = [("default", spec)]
    elif isinstance(spec, str) and spec.strip():
        items = []
        for part in spec.split(","):
            key, eq, val = part.strip().rpartition("=")
            if eq and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
                raise RarefyError(f"bad sparsity spec {spec!r}: {key.strip()!r} is not a "
                                  "component name (expected e.g. mlp=0.6,attn=0.4)")
            items.append((key.strip() if eq else "default", val.strip()))
    else:
        raise RarefyError(f"bad sparsity spec {spec!r} (expected e.g. 0.5 or mlp=0.6,attn=0.4)")
    out: dict[str, float] = {}
    for key, val in items:
        if key in out:
            raise RarefyError(f"bad sparsity spec {spec!r}: {key} is given twice")
        out[key] = check_sparsity(val, f"sparsity of {key}" if key != "default" else "sparsity")
    return out


@dataclass
class Target:
    """One linear to prune: HF module name, the module, its decoder layer, its sparsity."""

    name: str
    module: DenseLinear
    layer: int
    sparsity: float


def sparsity_for(name: str, spec: dict[str, float]) -> float:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in spec:
        return spec[leaf]
    for group, marker in GROUPS.items():
        if group in spec and marker in name:
            return spec[group]
    return spec.get("default", 0.0)


def select_targets(model, spec: dict[str, float], pattern: Pattern,
                   skip: tuple[str, ...] = ()) -> tuple[list[Target], list[str]]:
    """(targets with sparsity > 0, names left dense by `skip`); validates names and shapes.

    Raises RarefyError for spec keys that name no component, fused or non-dense
    projections, and matrices the pattern does not fit.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise RarefyError("pruning needs a rarefy DecoderLM (model.model.layers)")
    found: list[tuple[str, torch.nn.Module, int]] = []
    for i, layer in enumerate(layers):
        for sub, mod in layer.named_modules():
            if getattr(mod, "qkv_proj", None) is not None or getattr(mod, "gate_up_proj", None) is not None:
                raise RarefyError("pruning needs separate projections; prune before fuse_projections()")
            if hasattr(mod, "in_features") and hasattr(mod, "out_features") and sub:
                name = f"model.layers.{i}.{sub}"
                if not isinstance(mod, DenseLinear):
                    raise RarefyError(f"cannot prune {name}: it is a {type(mod).__name__}, not a dense "
                                      "linear (load the model with dtype fp32 or bf16)")
                found.append((name, mod, i))
    leaves = {n.rsplit(".", 1)[-1] for n, _, _ in found}
    unknown = [k for k in spec if k not in leaves and k not in GROUPS and k != "default"]
    if unknown:
        raise RarefyError(f"sparsity spec names {unknown[0]!r}, which is not a component of this "
                          f"model (use attn, mlp or one of {', '.join(sorted(leaves))})")
    if any(not isinstance(p, str) or not p for p in skip):
        raise RarefyError("--skip patterns must be non-empty strings")
    targets, skipped = [], []
    for name, mod, i in found:
        s = sparsity_for(name, spec)
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            skipped.append(name)
        elif s > 0:
            pattern.check_shape(name, tuple(mod.weight.shape))
            targets.append(Target(name, mod, i, s))
    return targets, skipped


# ----------------------------------------------------------------------------- per-matrix methods

def magnitude_keep(w: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """w [out, in] -> keep mask [out, in] bool; score |w|, one comparison group per matrix."""
    return keep_mask(w.float().abs(), sparsity, pattern, per_row=False)


def wanda_keep(w: torch.Tensor, sq_norms: torch.Tensor, sparsity: float,
               pattern: Pattern) -> torch.Tensor:
    """w [out, in], sq_norms [in] fp32 = sum over tokens of x_j^2 -> keep mask [out, in] bool.

    Score |w_ij| * ||x_j||_2; unstructured comparison group = one output row.
    """
    score = w.float().abs() * sq_norms.sqrt().unsqueeze(0)
    return keep_mask(score, sparsity, pattern, per_row=True)


def hessian_factor(h: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """h [in, in] = 2 X^T X / N (fp32) -> (U, dead, damp).

    U [in, in] fp32: upper Cholesky factor of H^-1 (H^-1 = U^T U), whose rows give
    the OBS updates in elimination order; dead [in] bool: inputs never active
    (H_jj == 0; their diagonal is set to 1 so H stays invertible); damp: the
    lambda added to the diagonal as a fraction of mean diag (`dampening`, raised
    10x per retry while H is not positive definite). Factorized in float64 for stability.
    """
    h = h.double().clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean = diag.mean().item()
    damp = dampening * mean
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return u.float(), dead, damp / mean
        damp = max(damp * 10, 1e-6 * mean)  # relative to mean diag, as `dampening`
    raise RarefyError("SparseGPT: the calibration Hessian is not positive definite even with "
                      "heavy dampening (are the calibration activations finite?)")


def sparsegpt_prune(weights: list[torch.Tensor], u: torch.Tensor, dead: torch.Tensor,
                    sparsities: list[float], pattern: Pattern,
                    blocksize: int = 128) -> list[torch.Tensor]:
    """OBS pruning of matrices that share one input (e.g. q/k/v) -> pruned fp32 copies.

    weights: [rows_i, in] each (any float dtype); u, dead: from `hessian_factor`;
    sparsities[i] applies to weights[i] (ignored for N:M). Rows are independent
    given H, so the matrices are stacked and swept once; masks are chosen per
    matrix so each gets exactly its own count.

    Columns are eliminated left to right in blocks of `blocksize`. Within a block
    the mask is chosen by saliency w^2 / U_jj^2 (the OBS error of dropping w):
    unstructured = the lowest entries of the whole block (adaptive mask), with
    the matrix's exact count spread over the blocks by `masks.budget`; block
    RxC = the r x c tiles of lowest summed saliency; N:M = per row, the M-N
    lowest of each group of M columns, chosen when the sweep reaches the group
    (so it sees the updates from the columns before it). Dropping column j's
    weights w_j moves the error (w_j / U_jj) * U_j,j: onto the columns not yet
    eliminated, lazily for later blocks (one GEMM per block). Dead inputs get
    weight 0 (they never contribute to the output).
    """
    if u.device.type == "cpu" and torch.get_num_threads() > 1:
        # The sweep is thousands of small ops: intra-op threads only add fork/join
        # cost (2 cores: 1 thread ran it 2x faster idle, 50x faster on a busy machine).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return sparsegpt_prune(weights, u, dead, sparsities, pattern, blocksize)
        finally:
            torch.set_num_threads(threads)
    sizes = [w.shape[0] for w in weights]
    w_all = torch.cat([w.float() for w in weights]) if len(weights) > 1 else weights[0].float().clone()
    rows, cols = w_all.shape
    w_all[:, dead] = 0
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    unit = pattern.m if pattern.kind == "nm" else pattern.c if pattern.kind == "block" else 1
    bs = max(unit, blocksize // unit * unit)  # N:M groups and blocks never straddle two column blocks
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w_all[:, i1:i2]
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        drop = torch.zeros_like(w1, dtype=torch.bool)  # [rows, cnt], True = prune
        if pattern.kind != "nm":
            sal = w1.square() / d.square()
            for r0, n, s in zip(starts, sizes, sparsities):
                part = sal[r0:r0 + n]
                if pattern.kind == "block":
                    bsc = block_scores(part, pattern.r, pattern.c)
                    before = (n // pattern.r) * (i1 // pattern.c)
                    k = budget(s, before, before + bsc.numel())
                    drop[r0:r0 + n] = expand_blocks(lowest_k(bsc.reshape(1, -1), k).view(bsc.shape),
                                                    pattern.r, pattern.c)
                else:
                    k = budget(s, n * i1, n * i2)
                    drop[r0:r0 + n] = lowest_k(part.reshape(1, -1), k).view(part.shape)
        # The sweep works on transposed copies so each column is one contiguous row,
        # and does two ops per column: err = w * drop / d, then the rank-1 update.
        inv_d = d.reciprocal().unsqueeze(1)  # [cnt, 1]
        wt = w1.t().contiguous()  # [cnt, rows]
        scale = drop.t().float() * inv_d  # drop / d, [cnt, rows]
        errt = torch.empty_like(wt)
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                grp_drop = lowest_k(wt[g].square() * inv_d[g].square(), pattern.m - pattern.n, dim=0)
                torch.mul(grp_drop, inv_d[g], out=scale[g])
            torch.mul(wt[i], scale[i], out=errt[i])
            wt[i + 1:].addr_(u1[i, i + 1:], errt[i], alpha=-1.0)
        wt.masked_fill_(scale != 0, 0.0)  # dropped weights: exact zeros (column i's own update skipped)
        w_all[:, i1:i2] = wt.t()
        if i2 < cols:
            w_all[:, i2:].addmm_(errt.t(), u[i1:i2, i2:], alpha=-1.0)
    return list(w_all.split(sizes))


# ----------------------------------------------------------------------------- report

@dataclass
class MatrixResult:
    name: str  # HF module name, e.g. model.layers.3.mlp.down_proj
    shape: tuple[int, int]  # [out, in]
    target: float  # requested sparsity (1 - N/M for N:M)
    sparsity: float  # achieved: fraction of exact zeros in the pruned weight


@dataclass
class PruneReport:
    method: str
    pattern: str  # "unstructured", "2:4" or "block 4x4"
    matrices: list[MatrixResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # linears left dense by `skip`
    # per decoder layer: ||Y_pruned - Y_dense||_F / ||Y_dense||_F on its calibration inputs
    layer_errors: list[float] | None = None
    calibration: dict | None = None  # path, samples, seq_len, seed, tokens
    dampening: float | None = None  # SparseGPT only
    blocksize: int | None = None  # SparseGPT only
    device: str = "cpu"
    dtype: str = "float32"
    seconds: float = 0.0  # total wall time of prune_model
    seconds_forward: float = 0.0  # embedding + layer forwards + statistics
    seconds_solve: float = 0.0  # masks, SparseGPT solves, weight writes
    warnings: list[str] = field(default_factory=list)

    @property
    def overall_sparsity(self) -> float:
        """Zeros / parameters over the pruned matrices (0 if none was pruned)."""
        total = sum(m.shape[0] * m.shape[1] for m in self.matrices)
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.matrices)
        return zeros / total if total else 0.0

    def by_component(self) -> dict[str, float]:
        """Achieved sparsity per component name (q_proj, ..., down_proj)."""
        acc: dict[str, list[float]] = {}
        for m in self.matrices:
            z = acc.setdefault(m.name.rsplit(".", 1)[-1], [0.0, 0.0])
            z[0] += m.sparsity * m.shape[0] * m.shape[1]
            z[1] += m.shape[0] * m.shape[1]
        return {k: z / n for k, (z, n) in acc.items()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overall_sparsity"] = self.overall_sparsity
        return d

    def summary(self) -> str:
        lines = [f"{self.method} {self.pattern}: {len(self.matrices)} matrices, "
                 f"sparsity {self.overall_sparsity:.4f}, {self.seconds:.1f} s "
                 f"(forward {self.seconds_forward:.1f} s, solve {self.seconds_solve:.1f} s)"]
        lines += [f"  {k:<12} {v:.4f}" for k, v in self.by_component().items()]
        if self.layer_errors:
            lines.append("  layer output error: " + " ".join(f"{e:.3f}" for e in self.layer_errors))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def zero_fraction(w: torch.Tensor) -> float:
    return (w == 0).sum().item() / w.numel()


@torch.no_grad()
def prune_group(method: str, targets: list[Target], stat: torch.Tensor | None, tokens: int,
                pattern: Pattern, dampening: float = 0.01, blocksize: int = 128,
                warnings: list[str] | None = None) -> list[MatrixResult]:
    """Prune `targets` (linears reading one input) in place; returns their MatrixResults.

    stat: the shared input statistic from calibration (calibrate.StatsCollector):
    [in] sum of x_j^2 for wanda, [in, in] X^T X for sparsegpt, unused for
    magnitude; tokens: how many input rows it sums. Math runs in fp32 whatever
    the weight dtype; the result is cast back into the weight.
    """
    if method == "sparsegpt":
        u, dead, damp = hessian_factor(stat * (2.0 / max(tokens, 1)), dampening)
        if damp > dampening * 1.000001 and warnings is not None:
            warnings.append(f"{targets[0].name}: Hessian needed dampening {damp:.2g} of mean diag "
                            f"(asked {dampening:g}) to be positive definite")
        new = sparsegpt_prune([t.module.weight for t in targets], u, dead,
                              [t.sparsity for t in targets], pattern, blocksize)
        for t, w in zip(targets, new):
            t.module.weight.copy_(w)
    else:
        for t in targets:
            w = t.module.weight
            keep = (wanda_keep(w, stat, t.sparsity, pattern) if method == "wanda"
                    else magnitude_keep(w, t.sparsity, pattern))
            w.mul_(keep.to(w.dtype))
    return [MatrixResult(t.name, tuple(t.module.weight.shape), t.sparsity,
                         zero_fraction(t.module.weight)) for t in targets]


# ----------------------------------------------------------------------------- entry point

def prune_model(model, tokenizer, method: str, sparsity=None, pattern=None, block=None,
                calib: str | os.PathLike | None = None, calib_samples: int = 128,
                calib_len: int = 512, dampening: float = 0.01, blocksize: int = 128,
                skip=(), progress: bool = True, seed: int = 0,
                batch_size: int = 8) -> PruneReport:
    """Prune `model`'s decoder linears in place; returns a PruneReport.

    sparsity: float, spec string or dict (`parse_sparsity_spec`); required for
        unstructured and block patterns, must be None with an N:M pattern.
    pattern: N:M as (n, m) or "n:m"; block: (r, c) or "RxC" (needs sparsity).
    calib: text file for wanda/sparsegpt (`calibration_batches` draws
        `calib_samples` random windows of `calib_len` tokens with `seed`);
        optional for magnitude, where it only adds per-layer output errors.
    dampening: SparseGPT's lambda as a fraction of mean diag(H); blocksize: its
        column block. skip: fnmatch patterns on module names left dense.
    batch_size: calibration samples per forward pass.
    Every input is validated (RarefyError) before any weight changes.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise RarefyError(f"unknown pruning method {method!r} (use {', '.join(METHODS)})")
    nm, blk = parse_pattern(pattern), parse_block(block)
    if nm is not None and blk is not None:
        raise RarefyError("choose one of an N:M pattern and a block shape, not both")
    if nm is not None:
        if sparsity is not None:
            raise RarefyError(f"the {nm.n}:{nm.m} pattern fixes the sparsity at "
                              f"{nm.nm_sparsity:g}; do not give a sparsity with it")
        spec = {"default": nm.nm_sparsity}
    else:
        if sparsity is None:
            raise RarefyError("give a sparsity (e.g. 0.5 or mlp=0.6,attn=0.4) or an N:M pattern")
        spec = parse_sparsity_spec(sparsity)
    pat = nm or blk or Pattern()
    if method != "magnitude" and calib is None:
        raise RarefyError(f"{method} needs calibration text: give --calib FILE")
    if calib is not None and not os.path.isfile(calib):
        raise RarefyError(f"calibration file not found: {calib}")
    if calib is not None and tokenizer is None:
        raise RarefyError("calibration needs the model's tokenizer (the checkpoint has none)")
    for what, v in (("calibration samples", calib_samples), ("calibration length", calib_len),
                    ("SparseGPT block size", blocksize), ("batch size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise RarefyError(f"{what} must be a positive integer, got {v!r}")
    if calib is not None and calib_len > model.config.max_position_embeddings:
        raise RarefyError(f"calibration length {calib_len} exceeds the model's context of "
                          f"{model.config.max_position_embeddings} tokens")
    if not (isinstance(dampening, (int, float)) and math.isfinite(dampening) and dampening >= 0):
        raise RarefyError(f"dampening must be a finite number >= 0, got {dampening!r}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    targets, skipped = select_targets(model, spec, pat, skip)

    w0 = model.model.embed_tokens.weight
    report = PruneReport(method, pat.describe(), skipped=skipped, device=str(w0.device),
                         dtype=str(w0.dtype).removeprefix("torch."))
    if method == "sparsegpt":
        report.dampening, report.blocksize = float(dampening), blocksize
    for p in skip:
        if not any(fnmatch.fnmatchcase(n, p) for n in skipped):
            report.warnings.append(f"--skip {p} matches no prunable linear (lm_head and the "
                                   "embeddings are never pruned anyway)")
    from rarefy.sparsity import calibrate  # imports this module: import here, not at the top

    if not targets:
        report.warnings.append("nothing to prune: every linear is skipped or at sparsity 0")
    elif calib is None:
        t1 = time.perf_counter()
        for t in targets:
            report.matrices += prune_group(method, [t], None, 0, pat)
        report.seconds_solve = time.perf_counter() - t1
    else:
        batches = calibrate.calibration_batches(tokenizer, calib, calib_samples, calib_len, seed)
        report.calibration = {"path": os.path.abspath(calib), "samples": calib_samples,
                              "seq_len": calib_len, "seed": seed, "tokens": batches.numel()}
        calibrate.prune_layerwise(model, batches, method, targets, pat, report,
                                  dampening=dampening, blocksize=blocksize,
                                  batch_size=batch_size, progress=progress)
    report.seconds = time.perf_counter() - t0
    return report
