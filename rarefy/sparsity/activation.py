"""Activation sparsity, TEAL-style: zero small entries of each projection's input.

For y = W x, every zeroed input channel i means column i of W need not be read. Four inputs
per decoder layer are sparsified (q/k/v share one input, gate/up share one):

    attn_in   input of q_proj, k_proj and v_proj (the attention RMSNorm output)
    o_in      input of o_proj (the attention output)
    mlp_in    input of gate_proj and up_proj (the MLP RMSNorm output)
    down_in   input of down_proj (SiLU(gate) * up)

The shared inputs are sparsified once, before the attention / MLP module, so every
projection that reads them sees the same zeros (q, k and v; gate and up).

Three rules decide which entries are zeroed (rarefy.sparsity.activation_modes): ``threshold``
(|x| < t), ``topk`` (the k largest |x| of each token are kept) and ``adaptive`` (k per token
from the entropy of the token's magnitudes). They rank entries by a *criterion*
(rarefy.sparsity.activation_criteria): |x| (``magnitude``) or |x| times the norm of the weight
column reading the channel (``weighted``). ``calibrate_thresholds`` runs calibration text
through the dense model, gathers per-input statistics and turns each target sparsity into one
parameter per input. With uniform allocation every input gets the target sparsity. With
``greedy=True`` (rarefy.sparsity.activation_greedy) each layer's inputs get different
sparsities whose weight-weighted average is the target. With ``allocation="global"``
(rarefy.sparsity.activation_global) sparsity also moves between layers, by output-KL
sensitivity. ``sequential=True`` (rarefy.sparsity.activation_sequential) derives each input's
parameter from activations already sparsified upstream.

``sparsify_activations`` installs forward pre-hooks that zero the entries; compute stays
dense (this is the quality reference the sparse kernels must match). Calibrations are saved
as JSON (``save_thresholds`` / ``load_thresholds``, format in docs/activation-sparsity.md).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from rarefy.errors import RarefyError
from rarefy.sparsity.activation_criteria import (
    CRITERIA,
    check_criterion,
    check_scales,
    input_scales,
    scale_summary,
)
from rarefy.sparsity.activation_modes import (
    MODES,
    PARAM_KEY,
    InputStats,
    apply_rule,
    check_mode,
    check_param,
    effective_count,
    finite_number,
)

FORMAT = "rarefy-activation-thresholds"
VERSION = 4  # written only when the file carries a rotation; version 3 otherwise
READABLE_VERSIONS = (1, 2, 3, 4)
ROTATION_KINDS = ("vo",)  # the rotations a calibration file can carry (rarefy.sparsity.activation_rotation)
ALLOCATIONS = ("uniform", "greedy", "global")
INPUT_NAMES = ("attn_in", "o_in", "mlp_in", "down_in")
SAMPLE_PER_INPUT = 1 << 18  # |x| values kept per input for the quantiles


def _key(s: float) -> str:
    return f"{float(s):.4f}"


@dataclass
class LevelRule:
    """What sparsify_activations applies for one level: a mode and one parameter per input."""

    mode: str
    params: dict[str, float]
    criterion: str = "magnitude"  # or "weighted": rank by |x| * c (rarefy.sparsity.activation_criteria)


@dataclass
class Thresholds:
    """One calibration: for each level (target sparsity) one parameter per input.

    thresholds[level_key][f"{layer}.{input}"] = t for threshold mode (zero |x| < t); other modes
    keep their parameters in ``params`` (keep fractions for topk, entropy scales for adaptive).
    ``input_sparsity[level_key][name]`` is the sparsity each input was calibrated to (the
    level for uniform allocation, the greedy allocation otherwise).
    """

    sparsities: list[float]
    thresholds: dict[str, dict[str, float]]
    model: dict = field(default_factory=dict)
    mode: str = "threshold"
    allocation: str = "uniform"
    params: dict[str, dict[str, float]] = field(default_factory=dict)
    input_sparsity: dict[str, dict[str, float]] = field(default_factory=dict)
    inputs: dict[str, dict] = field(default_factory=dict)  # name -> {"width", "weights"}
    calibration: dict = field(default_factory=dict)
    greedy: dict = field(default_factory=dict)  # per-level layer errors, greedy vs uniform
    measured: dict = field(default_factory=dict)  # level -> {"weighted", "entries"}
    version: int = VERSION
    criterion: str = "magnitude"
    # a rotation folded into the weights before calibrating (format 4): its description, and
    # the matrices (per layer, one [head_dim, head_dim] per key/value head) kept in a sidecar
    rotation: dict = field(default_factory=dict)
    rotations: list | None = None

    def __post_init__(self):
        if self.mode == "threshold" and not self.params:
            self.params = self.thresholds
        if self.mode == "threshold" and not self.thresholds:
            self.thresholds = self.params

    def _level(self, s: float) -> str:
        key = _key(s)
        if key not in self.params:
            raise RarefyError(f"no thresholds for sparsity {s}; calibrated: {', '.join(self.params)}")
        return key

    def for_sparsity(self, s: float) -> dict[str, float]:
        """Threshold mode, magnitude criterion: the per-input thresholds of level s."""
        key = self._level(s)
        if self.mode != "threshold":
            raise RarefyError(f"this calibration is in {self.mode} mode: it has no thresholds "
                              "(apply it with rule(s) / sparsify_activations)")
        if self.criterion != "magnitude":
            raise RarefyError(f"this calibration uses the {self.criterion} criterion: its thresholds apply to "
                              "|x| * c, not |x| (apply it with rule(s): sparsify_activations or "
                              "use_activation_sparsity)")
        return self.thresholds[key]

    def rule(self, s: float) -> LevelRule:
        return LevelRule(self.mode, self.params[self._level(s)], self.criterion)

    def sparsity_of_inputs(self, s: float) -> dict[str, float]:
        key = self._level(s)
        return self.input_sparsity.get(key) or {n: float(s) for n in self.params[key]}


def check_sparsities(values) -> list[float]:
    out = []
    for v in values:
        s = float(v)
        if not 0.0 <= s < 1.0:
            raise RarefyError(f"activation sparsity must be in [0, 1), got {v}")
        out.append(s)
    if not out:
        raise RarefyError("give at least one sparsity")
    return sorted(set(out))


# -- where the inputs are ---------------------------------------------------------------

@dataclass
class InputSite:
    hook: nn.Module  # its forward pre-hook sees the input as args[0]
    projections: list[nn.Module]  # the projections that read it

    @property
    def width(self) -> int:
        return self.projections[0].in_features

    @property
    def weights(self) -> int:
        return sum(p.in_features * p.out_features for p in self.projections)


def decoder_layers(model):
    return model.model.layers if hasattr(model, "model") else model.layers


def _first(owner, names, what, i):
    for n in names:
        m = getattr(owner, n, None)
        if m is not None:
            return m
    raise RarefyError(f"layer {i} has no {'/'.join(names)} to take {what} from")


def input_sites(model) -> dict[str, InputSite]:
    """"{layer}.{input}" -> where the input enters (hook module) and which projections read it."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = getattr(attn, "qkv_proj", None)
        qkv = [qkv] if qkv is not None else [_first(attn, (n,), "attn_in", i) for n in ("q_proj", "k_proj", "v_proj")]
        gu = getattr(mlp, "gate_up_proj", None)
        gu = [gu] if gu is not None else [_first(mlp, (n,), "mlp_in", i) for n in ("gate_proj", "up_proj")]
        o = _first(attn, ("o_proj",), "o_in", i)
        down = _first(mlp, ("down_proj",), "down_in", i)
        out[f"{i}.attn_in"] = InputSite(attn, qkv)
        out[f"{i}.o_in"] = InputSite(o, [o])
        out[f"{i}.mlp_in"] = InputSite(mlp, gu)
        out[f"{i}.down_in"] = InputSite(down, [down])
    return out


def input_weights(model) -> dict[str, int]:
    """Weights each input gates: attn_in -> q+k+v, o_in -> o, mlp_in -> gate+up, down_in -> down."""
    return {n: s.weights for n, s in input_sites(model).items()}


def model_signature(model) -> dict:
    cfg = model.config
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size}


# -- calibration ------------------------------------------------------------------------

@dataclass
class CalibrationData:
    """Dense statistics of every input, and (for greedy) every layer's input on a few windows."""

    stats: dict[str, InputStats]  # statistics of |x| (magnitude criterion), or of the first criterion
    layer_inputs: list[list[torch.Tensor]]  # [layer][window] hidden state entering the layer
    rope: list[tuple]  # [window] (cos, sin, positions)
    seq_len: int
    samples: int
    seed: int
    criterion_stats: dict[str, dict[str, InputStats]] = field(default_factory=dict)  # criterion -> stats
    scales: dict[str, dict[str, torch.Tensor] | None] = field(default_factory=dict)  # criterion -> c per input
    windows: list[list[int]] = field(default_factory=list)  # the calibration windows' tokens

    def stats_for(self, criterion: str) -> dict[str, InputStats]:
        if criterion not in self.criterion_stats:
            raise RarefyError(f"no calibration statistics for the {criterion} criterion; collected: "
                              f"{', '.join(self.criterion_stats) or 'magnitude'}")
        return self.criterion_stats[criterion]


@torch.no_grad()
def collect_statistics(model, token_ids: list[int], seq_len: int = 512, samples: int = 16, seed: int = 0,
                       keep_windows: int = 0, progress: bool = False,
                       criteria=("magnitude",)) -> CalibrationData:
    """One dense pass over `samples` random windows of `seq_len` tokens. Keeps, per input and
    criterion, a uniform sample of the scores (|x|, or |x| * c for ``weighted``) and every
    token's effective channel count, and the inputs of every decoder layer for the first
    `keep_windows` windows (for the greedy allocation)."""
    criteria = list(dict.fromkeys(check_criterion(c) for c in criteria))
    if not criteria:
        raise RarefyError("give at least one criterion")
    if samples < 1 or seq_len < 2:
        raise RarefyError("calibration needs at least one window of at least 2 tokens")
    if len(token_ids) < seq_len + 1:
        raise RarefyError(f"calibration text has {len(token_ids)} tokens; need more than {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    sites = input_sites(model)
    scales = {c: input_scales(model, c) for c in criteria}
    pools = {c: {n: [] for n in sites} for c in criteria}
    neffs = {c: {n: [] for n in sites} for c in criteria}
    per_window = max(1, SAMPLE_PER_INPUT // samples)
    layers = decoder_layers(model)
    layer_inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    rope: list[tuple] = []
    window = [0]

    def hook(name):
        def pre(mod, args):
            x = args[0].detach()
            idx = torch.randint(0, x.numel(), (min(per_window, x.numel()),), generator=gen)
            for c in criteria:
                sc = scales[c]
                score = x.abs() if sc is None else (x * sc[name].to(x.dtype)).abs()
                pools[c][name].append(score.reshape(-1).float().cpu()[idx])
                neffs[c][name].append(effective_count(score).reshape(-1).double().cpu())
        return pre

    def layer_hook(i):
        def pre(mod, args):
            if window[0] < keep_windows:
                layer_inputs[i].append(args[0].detach().clone())
                if i == 0:
                    rope.append(tuple(a.detach() for a in args[1:4]))
        return pre

    handles = [s.hook.register_forward_pre_hook(hook(n)) for n, s in sites.items()]
    handles += [layer.register_forward_pre_hook(layer_hook(i)) for i, layer in enumerate(layers)]
    starts = torch.randint(0, len(token_ids) - seq_len, (samples,), generator=gen).tolist()
    windows = [list(token_ids[s:s + seq_len]) for s in starts]
    it = starts
    if progress:
        from tqdm import tqdm
        it = tqdm(starts, desc="calibrating", unit="window", leave=False)
    device = next(model.parameters()).device
    try:
        for w, s in enumerate(it):
            window[0] = w
            model(torch.tensor([token_ids[s:s + seq_len]], device=device))
    finally:
        for h in handles:
            h.remove()
    by = {c: {n: InputStats(sites[n].width, sites[n].weights, torch.cat(pools[c][n]).double().sort().values,
                            torch.cat(neffs[c][n])) for n in sites} for c in criteria}
    return CalibrationData(by[criteria[0]], layer_inputs, rope, seq_len, samples, seed, criterion_stats=by,
                           scales=scales, windows=windows)


def calibrate_thresholds(model, token_ids: list[int], sparsities, seq_len: int = 512, samples: int = 16,
                         seed: int = 0, progress: bool = False, mode: str = "threshold", greedy: bool = False,
                         greedy_step: float = 0.05, greedy_windows: int = 2, greedy_tokens: int = 256,
                         criterion: str = "magnitude", sequential: bool = False,
                         greedy_upstream: str = "dense", allocation: str | None = None,
                         global_tokens: int | None = None, global_method: str = "fisher",
                         global_refine: int = 0, global_match: int = 0) -> Thresholds:
    """Calibrate `mode` at each target sparsity from `samples` windows of `seq_len` tokens;
    uniform allocation, or greedy per layer (see rarefy.sparsity.activation_greedy); entries
    ranked by `criterion` (rarefy.sparsity.activation_criteria); with `sequential`, each
    input's parameter comes from activations already sparsified upstream
    (rarefy.sparsity.activation_sequential)."""
    check_mode(mode)
    check_criterion(criterion)
    sparsities = check_sparsities(sparsities)
    allocation = allocation or ("greedy" if greedy else "uniform")
    if allocation not in ALLOCATIONS:
        raise RarefyError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if allocation == "greedy":
        from rarefy.sparsity.activation_greedy import check_greedy_options
        check_greedy_options(sparsities, greedy_step, greedy_windows, greedy_tokens, greedy_upstream)
    if allocation == "global":
        from rarefy.sparsity.activation_global import DEFAULT_GRID, check_global_options
        check_global_options(sparsities, DEFAULT_GRID)
    data = collect_statistics(model, token_ids, seq_len, samples, seed,
                              keep_windows=min(greedy_windows, samples) if allocation != "uniform" else 0,
                              progress=progress, criteria=(criterion,))
    return calibrate_from_statistics(model, data, sparsities, mode, greedy_step=greedy_step,
                                     greedy_tokens=greedy_tokens, progress=progress, criterion=criterion,
                                     sequential=sequential, greedy_upstream=greedy_upstream, allocation=allocation,
                                     global_tokens=global_tokens, global_method=global_method,
                                     global_refine=global_refine, global_match=global_match)


def calibrate_from_statistics(model, data: CalibrationData, sparsities, mode: str = "threshold",
                              greedy: bool = False, greedy_step: float = 0.05, greedy_tokens: int = 256,
                              progress: bool = False, criterion: str = "magnitude",
                              sequential: bool = False, sequential_windows: int | None = None,
                              greedy_upstream: str = "dense", allocation: str | None = None,
                              global_windows: int = 1, global_grid=None,
                              global_tokens: int | None = None, global_method: str = "fisher",
                              global_refine: int = 0, global_samples: int = 4,
                              global_match: int = 0) -> Thresholds:
    """Parameters per level and input from collected statistics. ``allocation``: "uniform",
    "greedy" (rarefy.sparsity.activation_greedy) or "global" (rarefy.sparsity.activation_global);
    None: greedy if ``greedy`` else uniform."""
    check_mode(mode)
    check_criterion(criterion)
    sparsities = check_sparsities(sparsities)
    allocation = allocation or ("greedy" if greedy else "uniform")
    if allocation not in ALLOCATIONS:
        raise RarefyError(f"unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    greedy = allocation == "greedy"
    stats = data.stats_for(criterion) if data.criterion_stats else data.stats
    scales = data.scales.get(criterion) if data.scales else input_scales(model, criterion)
    names = list(stats)
    calibration = {"windows": data.samples, "seq_len": data.seq_len, "seed": data.seed}
    greedy_info: dict = {}
    if greedy:
        from rarefy.sparsity.activation_greedy import greedy_allocation
        if not data.layer_inputs or not data.layer_inputs[0]:
            raise RarefyError("greedy allocation needs layer inputs: collect_statistics(keep_windows > 0)")
        alloc, greedy_info = greedy_allocation(model, data, sparsities, mode, step=greedy_step,
                                               tokens=greedy_tokens, seed=data.seed, progress=progress,
                                               stats=stats, scales=scales, upstream=greedy_upstream)
        per_input = {_key(s): alloc[j] for j, s in enumerate(sparsities)}
        calibration["greedy"] = {"step": greedy_step, "windows": len(data.layer_inputs[0]),
                                 "tokens": greedy_info.pop("tokens"), "upstream": greedy_upstream}
    elif allocation == "global":
        from rarefy.sparsity.activation_global import DEFAULT_GRID, global_allocation
        if not data.layer_inputs or not data.layer_inputs[0]:
            raise RarefyError("global allocation needs layer inputs: collect_statistics(keep_windows > 0)")
        alloc, greedy_info = global_allocation(model, data, sparsities, mode, stats, scales,
                                               grid=global_grid or DEFAULT_GRID, windows=global_windows,
                                               tokens=global_tokens, progress=progress, method=global_method,
                                               refine=global_refine, samples=global_samples,
                                               match=global_match)
        per_input = {_key(s): alloc[j] for j, s in enumerate(sparsities)}
        calibration["global"] = {k: greedy_info.pop(k)
                                 for k in ("grid", "method", "refine", "samples", "windows", "tokens", "match")}
    else:
        per_input = {_key(s): {n: float(s) for n in names} for s in sparsities}
    if sequential:
        from rarefy.sparsity.activation_sequential import sequential_params
        if not data.windows:
            raise RarefyError("sequential calibration needs the calibration windows (collect_statistics)")
        windows = data.windows[:sequential_windows] if sequential_windows else data.windows
        params = sequential_params(model, windows, per_input, mode, scales, seed=data.seed, progress=progress)
        calibration["sequential"] = {"windows": len(windows)}
    else:
        params = {lk: {n: stats[n].param(mode, sv) for n, sv in level.items()} for lk, level in per_input.items()}
    inputs = {n: {"width": st.width, "weights": st.weights} for n, st in stats.items()}
    if scales is not None:
        for n, v in scale_summary(scales).items():
            inputs[n]["scale_norm"] = v
    return Thresholds(sparsities, params if mode == "threshold" else {}, model_signature(model), mode=mode,
                      allocation=allocation, params=params, input_sparsity=per_input,
                      inputs=inputs, calibration=calibration, greedy=greedy_info, criterion=criterion)


# -- applying ---------------------------------------------------------------------------

@contextmanager
def sparsify_activations(model, rule):
    """Zero projection-input entries by `rule` (a LevelRule, or a dict of per-input thresholds
    for threshold mode) while the context is open. Yields a dict counting zeroed and total
    entries per input, [zeroed, total] (the true sparsity reached)."""
    if not isinstance(rule, LevelRule):
        rule = LevelRule("threshold", rule)
    check_mode(rule.mode)
    scales = input_scales(model, rule.criterion)
    sites = input_sites(model)
    missing = [n for n in sites if n not in rule.params]
    if missing:
        raise RarefyError(f"thresholds lack {len(missing)} inputs of this model, e.g. {missing[0]} "
                          "(calibrated on another model?)")
    extra = [n for n in rule.params if n not in sites]
    if extra:
        raise RarefyError(f"thresholds name {len(extra)} inputs this model lacks, e.g. {extra[0]} "
                          "(calibrated on another model?)")
    counts = {n: [0, 0] for n in sites}

    def hook(name, width, param):
        scale = None if scales is None else scales[name]

        def pre(mod, args):
            x = args[0]
            if x.shape[-1] != width:
                raise RarefyError(f"input {name} has width {x.shape[-1]}, expected {width}")
            y, dropped = apply_rule(rule.mode, param, x, scale)
            counts[name][0] += int(dropped)
            counts[name][1] += x.numel()
            return (y,) + tuple(args[1:])
        return pre

    handles = [s.hook.register_forward_pre_hook(hook(n, s.width, float(rule.params[n])))
               for n, s in sites.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def measured_sparsity(counts: dict[str, list[int]], weights: dict[str, int] | None = None) -> float:
    """Fraction of zeroed entries over all inputs: each input weighted by its entries, or,
    given `weights` (input_weights(model)), by the weights it gates (the fraction of
    weight reads skipped)."""
    if weights is None:
        zero = sum(c[0] for c in counts.values())
        total = sum(c[1] for c in counts.values())
        return zero / total if total else 0.0
    wsum = sum(weights[n] for n, c in counts.items() if c[1])
    return sum(weights[n] * c[0] / c[1] for n, c in counts.items() if c[1]) / wsum if wsum else 0.0


def sparsity_report(counts: dict[str, list[int]], model) -> dict[str, float]:
    """{"weighted": by gated weights, "entries": by entries} over all four inputs of every layer."""
    return {"weighted": measured_sparsity(counts, input_weights(model)), "entries": measured_sparsity(counts)}


@torch.no_grad()
def measure_levels(model, token_ids: list[int], th: Thresholds, seq_len: int = 512, windows: int = 4,
                   seed: int = 1) -> dict[str, dict[str, float]]:
    """Sparsity each level reaches (weighted and entry-weighted) on `windows` random windows."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = min(seq_len, len(token_ids) - 1)
    starts = torch.randint(0, len(token_ids) - seq_len, (windows,), generator=gen).tolist()
    device = next(model.parameters()).device
    out = {}
    for s in th.sparsities:
        with sparsify_activations(model, th.rule(s)) as counts:
            for st in starts:
                model(torch.tensor([token_ids[st:st + seq_len]], device=device))
        out[_key(s)] = sparsity_report(counts, model)
    return out


# -- file -------------------------------------------------------------------------------

def save_thresholds(th: Thresholds, path: str | os.PathLike) -> None:
    """Write the calibration as JSON; a rotation's matrices go to a safetensors sidecar in
    the same directory (format 4), written first. Both go through temporary files."""
    rotated = th.rotations is not None
    data = {"format": FORMAT, "version": VERSION if rotated else 3, "mode": th.mode, "criterion": th.criterion,
            "allocation": th.allocation, "model": th.model, "sparsities": th.sparsities}
    if th.mode == "threshold":
        data["thresholds"] = th.thresholds
    else:
        data[PARAM_KEY[th.mode]] = th.params
    data["input_sparsity"] = th.input_sparsity
    for k in ("inputs", "calibration", "measured", "greedy"):
        if getattr(th, k):
            data[k] = getattr(th, k)
    if rotated:
        from rarefy.sparsity.activation_rotation import SIDECAR, save_vo_rotations
        kind = th.rotation.get("kind", "vo")
        if kind not in ROTATION_KINDS:
            raise RarefyError(f"a calibration file carries only the {', '.join(ROTATION_KINDS)} rotation, not {kind!r}")
        digest = save_vo_rotations(os.path.join(os.path.dirname(os.fspath(path)) or ".", SIDECAR), th.rotations)
        data["rotation"] = {**th.rotation, "kind": kind, "file": SIDECAR, "sha256": digest}
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_thresholds(path: str | os.PathLike, model=None) -> Thresholds:
    try:
        with open(path) as f:
            data = json.load(f)
    except (FileNotFoundError, IsADirectoryError):
        raise RarefyError(f"threshold file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RarefyError(f"{path} is not a rarefy threshold file (not JSON)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RarefyError(f"{path} is not a rarefy threshold file")
    try:
        th = _parse(data, path)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RarefyError(f"{path} is a malformed threshold file ({type(e).__name__}: {e})") from None
    if model is not None:
        _check_model(th, model, path)
    if th.rotation:
        th.rotations = _load_rotation(th.rotation, path, model)
    return th


def _load_rotation(info: dict, path, model):
    """The sidecar matrices of a version 4 file (checked against `model` when given)."""
    from rarefy.sparsity.activation_rotation import load_vo_rotations

    kind, name = info.get("kind"), info.get("file")
    if kind not in ROTATION_KINDS:
        raise RarefyError(f"{path}: unknown rotation {kind!r}; a calibration file carries {', '.join(ROTATION_KINDS)}")
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise RarefyError(f"{path}: rotation 'file' must name a file beside it, got {name!r}")
    sha = info.get("sha256")
    return load_vo_rotations(os.path.join(os.path.dirname(os.fspath(path)) or ".", name),
                             sha if isinstance(sha, str) else None, model)


def _parse(data: dict, path) -> Thresholds:
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        raise RarefyError(f"{path} has format version {version!r}; this rarefy reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    mode = data.get("mode", "threshold")
    if mode not in MODES:
        raise RarefyError(f"{path}: unknown mode {mode!r}; known: {', '.join(MODES)}")
    allocation = data.get("allocation", "uniform")
    if allocation not in ALLOCATIONS:
        raise RarefyError(f"{path}: unknown allocation {allocation!r}; known: {', '.join(ALLOCATIONS)}")
    if version == 1 and mode != "threshold":
        raise RarefyError(f"{path}: version 1 files hold thresholds only, not {mode!r}")
    criterion = data.get("criterion", "magnitude")
    if criterion not in CRITERIA:
        raise RarefyError(f"{path}: unknown criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    if version < 3 and criterion != "magnitude":
        raise RarefyError(f"{path}: version {version} files use the magnitude criterion only, not {criterion!r}")
    sparsities = data["sparsities"]
    if not isinstance(sparsities, list):
        raise RarefyError(f"{path}: 'sparsities' must be a list")
    sparsities = [float(s) for s in sparsities]
    if any(not 0.0 <= s < 1.0 for s in sparsities) or not sparsities:
        raise RarefyError(f"{path}: sparsities must be in [0, 1), got {sparsities}")
    key = PARAM_KEY[mode]
    if key not in data:
        raise RarefyError(f"{path}: {mode} mode needs '{key}'")
    params = _levels(data[key], sparsities, path, key, lambda v, where: check_param(mode, v, where))
    names = set(next(iter(params.values())))

    def frac(v, where):
        v = finite_number(v, where)
        if not 0.0 <= v < 1.0:
            raise RarefyError(f"{where}: an input sparsity must be in [0, 1), got {v}")
        return v

    per_input = _levels(data["input_sparsity"], sparsities, path, "input_sparsity", frac) \
        if "input_sparsity" in data else {}
    if per_input and set(next(iter(per_input.values()))) != names:
        raise RarefyError(f"{path}: input_sparsity and {key} name different inputs")
    rotation = data.get("rotation", {})
    if rotation and (version < 4 or not isinstance(rotation, dict)):
        raise RarefyError(f"{path}: 'rotation' needs a version 4 file holding an object")
    if version >= 4 and not rotation:
        raise RarefyError(f"{path}: a version 4 file must describe its rotation ('rotation')")
    inputs = data.get("inputs", {})
    if inputs and set(inputs) != names:
        raise RarefyError(f"{path}: 'inputs' and {key} name different inputs")
    return Thresholds(sparsities, params if mode == "threshold" else {}, data.get("model", {}), mode=mode,
                      allocation=allocation, params=params, input_sparsity=per_input, inputs=inputs,
                      calibration=data.get("calibration", {}), greedy=data.get("greedy", {}),
                      measured=data.get("measured", {}), version=version, criterion=criterion,
                      rotation=dict(rotation))


def _levels(table, sparsities, path, what, check) -> dict[str, dict[str, float]]:
    if not isinstance(table, dict) or set(table) != {_key(s) for s in sparsities}:
        raise RarefyError(f"{path}: '{what}' must have one entry per sparsity "
                          f"({', '.join(_key(s) for s in sparsities)})")
    names = None
    out = {}
    for lk, level in table.items():
        if not isinstance(level, dict) or not level:
            raise RarefyError(f"{path}: '{what}' level {lk} must map inputs to numbers")
        if names is None:
            names = set(level)
        elif set(level) != names:
            raise RarefyError(f"{path}: '{what}' levels name different inputs")
        out[lk] = {n: check(v, f"{path}: {what}[{lk}][{n}]") for n, v in level.items()}
    return out


def _check_model(th: Thresholds, model, path) -> None:
    sig = model_signature(model)
    if th.model and th.model != sig:
        raise RarefyError(f"{path} was calibrated on another model ({th.model}, this one is {sig})")
    sites = input_sites(model)
    names = set(next(iter(th.params.values())))
    if names != set(sites):
        lack = sorted(set(sites) - names) or sorted(names - set(sites))
        raise RarefyError(f"{path} does not match this model's inputs (e.g. {lack[0]}): calibrated on another model?")
    for n, info in th.inputs.items():
        width = info.get("width") if isinstance(info, dict) else None
        if width != sites[n].width:
            raise RarefyError(f"{path}: input {n} has width {width} in the file, {sites[n].width} in this model "
                              "(mismatched shapes)")
    if th.criterion != "magnitude":
        stored = {n: info["scale_norm"] for n, info in th.inputs.items()
                  if isinstance(info, dict) and isinstance(info.get("scale_norm"), (int, float))}
        if stored:
            check_scales(stored, input_scales(model, th.criterion), path)
