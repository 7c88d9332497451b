"""Evolutionary search of an activation-sparsity allocation, judged by the measured output KL.

The global allocation (rarefy.sparsity.activation_global) predicts each input's cost alone and
to second order, then adds the costs up. This search starts from that allocation and measures
instead: offspring of the current allocation are run through the sparsified model on
calibration windows, and the one whose next-token distribution is closest to the dense model's
replaces it. The scheme follows EvoPress (Sieberling et al., 2024, "EvoPress: Towards Optimal
Dynamic Model Compression via Evolutionary Search"), which searches per-layer weight-pruning
levels this way; here the units are the activation inputs of every layer:

- A mutation moves sparsity between two inputs of the same kind (attn_in, o_in, mlp_in,
  down_in) in different layers, by ``step`` on one side and the weight-balanced amount on the
  other, so the nominal average over gated weights stays the target exactly. Offspring carry
  1 to ``max_moves`` such moves.
- Selection in two stages, as EvoPress does: every offspring is scored on one window (rotating
  through the windows), the ``survivors`` best on ``stage2`` more windows beside the parent; the
  best replaces the parent only if it scores lower there. Passes start at the first layer an
  offspring changes, from the parent's cached layer inputs.
- Score = mean KL(dense || sparse) - price x (measured sparsity - target). Thresholds come from
  dense statistics, so the sparsity actually reached moves a little with upstream changes; the
  price (KL per unit of sparsity, measured at the start by a uniform shift of the allocation)
  keeps the search from buying KL with sparsity it does not deliver.
"""

from __future__ import annotations

import random

from rarefy.errors import RarefyError

MAX_SPARSITY = 0.9


def _layer(name: str) -> int:
    return int(name.split(".", 1)[0])


def _kinds(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(n.split(".", 1)[1], []).append(n)
    return out


def mutate(alloc: dict[str, float], weights: dict[str, int], kinds: dict[str, list[str]], rng: random.Random,
           step: float, moves: int, hi: float = MAX_SPARSITY) -> tuple[dict[str, float], int]:
    """A copy of `alloc` after `moves` level switches, and the first layer it changed.
    Each switch raises one input by `step` and lowers another of the same kind by the amount
    that keeps sum(weights * sparsity) unchanged; switches that would leave [0, hi] are redrawn."""
    out = dict(alloc)
    first = None
    pools = [ns for ns in kinds.values() if len(ns) > 1]
    if not pools:
        raise RarefyError("the search needs at least two layers to move sparsity between")
    done = tries = 0
    while done < moves and tries < 100 * moves:
        tries += 1
        up, down = rng.sample(rng.choice(pools), 2)
        d_down = step * weights[up] / weights[down]
        if out[up] + step > hi or out[down] - d_down < 0.0:
            continue
        out[up] += step
        out[down] -= d_down
        first = min(_layer(up), _layer(down), first if first is not None else 1 << 30)
        done += 1
    if first is None:
        raise RarefyError("no sparsity could be moved between layers (every input at 0 or at the maximum)")
    return out, first


def evolve_allocation(model, data, mode: str, stats, scales, start: dict[str, float], target: float,
                      generations: int, offspring: int = 8, survivors: int = 2, stage2: int = 2,
                      windows: int = 4, tokens: int | None = None, step: float = 0.05, max_moves: int = 3,
                      seed: int = 0, progress: bool = False):
    """The allocation after `generations` generations (see the module doc), and a log.
    `windows` calibration windows are kept (data.layer_inputs must hold them); stage 1 uses one
    of them per generation, stage 2 the next `stage2`."""
    from rarefy.sparsity.activation import input_weights
    from rarefy.sparsity.activation_refine import _Runner

    if generations < 0 or offspring < 1 or not 1 <= survivors <= offspring or stage2 < 0:
        raise RarefyError("the search needs generations >= 0, offspring >= 1 and 1 <= survivors <= offspring")
    if not 0.0 < step < 1.0 or max_moves < 1:
        raise RarefyError(f"the search needs a step in (0, 1) and at least one move, got {step}, {max_moves}")
    n_win = len(data.layer_inputs[0]) if data.layer_inputs else 0
    if n_win < min(windows, 1 + stage2) or windows < 1:
        raise RarefyError(f"the search needs {max(1, windows)} kept calibration windows, have {n_win}")
    windows = min(windows, n_win)
    stage2 = min(stage2, windows - 1)
    weights = input_weights(model)
    kinds = _kinds(start)
    rng = random.Random(seed)
    run = _Runner(model, data, mode, stats, scales, windows, tokens)
    everyone = list(range(windows))

    # the price of sparsity: KL per unit of measured sparsity, from a uniform shift of `start`
    kl0 = run.full(start, windows=everyone)
    s0 = run.last_sparsity
    shifted = {n: min(v + 0.02, MAX_SPARSITY) for n, v in start.items()}
    kl1 = run.full(shifted, windows=everyone)
    price = max((kl1 - kl0) / max(run.last_sparsity - s0, 1e-6), 0.0)

    def score(kl):
        return kl - price * (run.last_sparsity - target)

    log = {"price": price, "start": {"kl": kl0, "sparsity": s0}, "accepted": 0, "generations": []}
    parent = dict(start)
    it = range(generations)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="search", unit="gen", leave=False)
    for g in it:
        w1 = g % windows
        w2 = [(w1 + 1 + k) % windows for k in range(stage2)]
        p1 = score(run.full(parent, keep=True, windows=[w1]))
        kids = []
        for _ in range(offspring):
            child, first = mutate(parent, weights, kinds, rng, step, rng.randint(1, max_moves))
            kids.append((score(run.partial(child, first, windows=[w1])), first, child))
        kids.sort(key=lambda k: k[0])
        best = kids[0]
        parent_total = p1
        if stage2:
            parent_total += stage2 * score(run.full(parent, keep=True, windows=w2))
            finals = [(k[0] + stage2 * score(run.partial(k[2], k[1], windows=w2)), k[2]) for k in kids[:survivors]]
            best_total, best_child = min(finals, key=lambda f: f[0])
        else:
            best_total, best_child = best[0], best[2]
        accepted = best_total < parent_total
        if accepted:
            parent = best_child
            log["accepted"] += 1
        log["generations"].append({"parent": round(parent_total / (1 + stage2), 6),
                                   "best": round(best_total / (1 + stage2), 6), "accepted": accepted})
    kl_end = run.full(parent, windows=everyone)
    log["end"] = {"kl": kl_end, "sparsity": run.last_sparsity}
    return parent, log
