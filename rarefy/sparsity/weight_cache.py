"""Differential weight cache for one SwiGLU MLP (CPU decode with contextual sparsity).

With contextual (per-token) activation sparsity only the active intermediate neurons of an
MLP matter: neuron i contributes ``silu(gate[i] . x) * (up[i] . x) * down[:, i]``. Gathering
the active rows with ``index_select`` every token copies all of them; consecutive tokens'
active sets overlap heavily (Deja Vu, Liu et al. 2023, report slowly changing contextual
sparsity; the sparse_transformers project builds a "differential weight cache" on it), so
this cache copies only the neurons that changed.

Layout (docs/weight-cache.md):
    pool_gu  [capacity, 2, H]: per slot the gate row then the up row (``interleave=True``), or
             [2, capacity, H] (gate pool then up pool, ``interleave=False``)
    pool_d   [capacity, H]: per slot the neuron's column of down (a row of down^T)
    slots [0, n) hold the n active neurons; ``active_neurons()`` gives their ids in slot order.

Per token ``update(mask)`` XORs the new mask with the previous one (C++,
rarefy/kernels/weight_cache_cpu): removed neurons free their slots, added neurons are copied
into freed slots (paired replacement) or appended; when the active count shrinks the last
valid slots move into the holes, so the pool stays compact and ``mlp(x)`` reads its first n
rows with no further copies. The pool never holds more than ``capacity =
ceil(max_active_fraction * I)`` neurons: a mask with more active neurons raises RarefyError,
or, if ``scores`` are given, keeps the ``capacity`` highest-scoring ones.

    cache = DifferentialWeightCache(gate, up, down, max_active_fraction=0.5)
    for x, mask in tokens:             # mask: bool [I]
        cache.update(mask)             # copies only the changed neurons
        y = cache.mlp(x)               # = MLP(x) with the inactive neurons zeroed

Memory: the cache keeps its own source copy of down^T ([I, H], one transposed copy at
construction) and of gate/up when they are not already contiguous in the cache dtype, plus
the pool (3 * capacity * H weights). Not thread-safe: one cache per MLP per decoding thread.
"""

from __future__ import annotations

import math

import torch

from rarefy.errors import RarefyError
from rarefy.kernels import weight_cache_cpu as _wc

__all__ = ["DifferentialWeightCache", "index_select_rows"]

_DTYPES = (torch.float16, torch.float32)


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def index_select_rows(gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor, mask: torch.Tensor):
    """Baseline: gather the active neurons' rows afresh with ``torch.index_select``.

    gate, up, down_t: [I, H] (down_t = down^T, contiguous rows); mask: bool [I].
    Returns ``(idx, g, u, d)``: the active neuron ids and three new [n, H] tensors.
    """
    idx = mask.nonzero().squeeze(1)
    return idx, gate.index_select(0, idx), up.index_select(0, idx), down_t.index_select(0, idx)


class DifferentialWeightCache:
    """The active neurons' weights of one SwiGLU MLP in a bounded, compact pool (CPU).

    Args:
        gate, up: ``[I, H]`` weights (``nn.Linear`` layout), any float dtype, CPU.
        down: ``[H, I]`` weight; or ``[I, H]`` down^T if ``down_transposed=True``.
        max_active_fraction: in (0, 1]; the pool has ``ceil(max_active_fraction * I)`` slots.
        dtype: pool (and source) dtype, ``torch.float16`` (default) or ``torch.float32``.
        interleave: store each slot's gate and up rows next to each other (one stream for
            the fused gate/up pass); False keeps separate gate and up pools.

    Raises RarefyError on bad shapes, dtypes, devices or fraction.
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, max_active_fraction: float, *,
                 dtype: torch.dtype = torch.float16, interleave: bool = True, down_transposed: bool = False):
        if not isinstance(max_active_fraction, (int, float)) or isinstance(max_active_fraction, bool) \
                or not (0.0 < float(max_active_fraction) <= 1.0):
            raise RarefyError(f"max_active_fraction must be in (0, 1], got {max_active_fraction!r}")
        if dtype not in _DTYPES:
            raise RarefyError(f"weight cache dtype must be torch.float16 or torch.float32, got {dtype}")
        for name, t in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise RarefyError(f"{name} must be a 2-D floating-point tensor, got "
                                  f"{getattr(t, 'shape', type(t).__name__)}")
            if t.device.type != "cpu":
                raise RarefyError(f"{name} must be on the CPU, got {t.device}")
        i, h = gate.shape
        if up.shape != (i, h):
            raise RarefyError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
        want_down = (i, h) if down_transposed else (h, i)
        if down.shape != want_down:
            raise RarefyError(f"down must be {'[I, H]' if down_transposed else '[H, I]'} = {list(want_down)}, "
                              f"got {list(down.shape)}")
        if i == 0 or h == 0:
            raise RarefyError(f"empty MLP weights ({i} x {h})")
        if not _wc.available():
            raise RarefyError(f"weight cache extension unavailable: {_wc._state['error']}")

        self.intermediate_size, self.hidden_size = i, h
        self.max_active_fraction = float(max_active_fraction)
        # Rounding guard: 0.5 * 1536 is 768, not 769, whatever float error the product has.
        self.capacity = max(1, min(i, math.ceil(round(self.max_active_fraction * i, 9))))
        self.dtype, self.interleave = dtype, interleave
        self.src_gate = gate.detach().to(dtype).contiguous()
        self.src_up = up.detach().to(dtype).contiguous()
        d = down.detach() if down_transposed else down.detach().t()
        self.src_down_t = d.to(dtype).contiguous()

        cap = self.capacity
        if interleave:
            self.pool_gu = torch.zeros(cap, 2, h, dtype=dtype)
            self.pool_gate, self.pool_up = self.pool_gu[:, 0], self.pool_gu[:, 1]
        else:
            self.pool_gu = torch.zeros(2, cap, h, dtype=dtype)
            self.pool_gate, self.pool_up = self.pool_gu[0], self.pool_gu[1]
        self.pool_down_t = torch.zeros(cap, h, dtype=dtype)
        # maps[0] = n active, maps[1:1+I] = neuron -> slot, maps[1+I:] = slot -> neuron (-1 = none)
        self._maps = torch.full((1 + i + cap,), -1, dtype=torch.int32)
        self._maps[0] = 0
        self._prev = torch.zeros(i, dtype=torch.bool)
        self.n_active = 0
        self._update = _wc.update_op()
        self._mlp = torch.ops.rarefy_wcache.sparse_mlp
        self._args = (self.src_gate, self.src_up, self.src_down_t, self.pool_gate, self.pool_up,
                      self.pool_down_t, self._maps, self._prev)

    @classmethod
    def from_mlp(cls, mlp, max_active_fraction: float, **kw) -> "DifferentialWeightCache":
        """From a rarefy ``MLP`` with plain float weights and no biases (dense or fp16-weight
        projections; gate/up separate or stacked by fuse_projections())."""
        f = mlp.intermediate_size
        gu = getattr(mlp, "gate_up_proj", None)
        parts = [gu, mlp.down_proj] if gu is not None else [getattr(mlp, "gate_proj", None),
                                                           getattr(mlp, "up_proj", None), mlp.down_proj]
        if any(not isinstance(getattr(p, "weight", None), torch.Tensor) or getattr(p, "bias", None) is not None
               for p in parts):
            raise RarefyError("weight cache needs an MLP whose gate/up/down projections hold plain weights "
                              "and no biases")
        ws = [p.weight.detach() for p in parts]
        g, u, d = (ws[0][:f], ws[0][f:], ws[1]) if gu is not None else ws
        return cls(g, u, d, max_active_fraction, **kw)

    # ------------------------------------------------------------------ per token
    def update(self, mask: torch.Tensor, scores: torch.Tensor | None = None) -> int:
        """Make the pool hold exactly the neurons set in ``mask`` (bool [I]); returns their count.

        Only neurons whose bit changed since the last update are copied. If ``mask`` has more
        than ``capacity`` active neurons: with ``scores`` (float32 [I]) the ``capacity``
        highest-scoring active ones are kept (ties: lower index; NaN last), without it
        RarefyError is raised and the cache is left unchanged.
        """
        try:
            n = self._update(mask, scores, *self._args)
        except (TypeError, ValueError) as e:
            raise RarefyError(f"weight cache update: {_first_line(e)}") from None
        except RuntimeError:
            if not isinstance(mask, torch.Tensor) or not (scores is None or isinstance(scores, torch.Tensor)):
                raise RarefyError("weight cache update: mask (and scores) must be torch.Tensors, got "
                                  f"{type(mask).__name__}") from None
            raise
        if n < 0:
            raise RarefyError(f"mask has {-n} active neurons, more than the weight cache's capacity "
                              f"{self.capacity} (max_active_fraction={self.max_active_fraction:g} of "
                              f"{self.intermediate_size}); pass scores to keep the top {self.capacity}")
        self.n_active = n
        return n

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU MLP of x (fp32 [..., H]) over the cached (active) neurons only."""
        try:
            return self._mlp(x, self.pool_gate, self.pool_up, self.pool_down_t, self.n_active, -1)
        except (TypeError, ValueError) as e:
            raise RarefyError(f"weight cache mlp: {_first_line(e)}") from None
        except RuntimeError:
            if not isinstance(x, torch.Tensor):
                raise RarefyError(f"weight cache mlp: x must be a torch.Tensor, got {type(x).__name__}") from None
            raise

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        self.update(mask, scores)
        return self.mlp(x)

    # ------------------------------------------------------------------ inspection
    def reset(self) -> None:
        """Forget every neuron (no copies)."""
        self._maps.fill_(-1)
        self._maps[0] = 0
        self._prev.zero_()
        self.n_active = 0

    @property
    def mask(self) -> torch.Tensor:
        """The current active-neuron mask (bool [I], a copy)."""
        return self._prev.clone()

    def active_neurons(self) -> torch.Tensor:
        """Neuron id held by each valid slot, in slot order (int64 [n])."""
        i = self.intermediate_size
        return self._maps[1 + i:1 + i + self.n_active].long()

    def slot_of(self) -> torch.Tensor:
        """Slot of every neuron, -1 where inactive (int64 [I])."""
        return self._maps[1:1 + self.intermediate_size].long()

    def gate_rows(self) -> torch.Tensor:
        """Views of the valid pool rows: gate [n, H]."""
        return self.pool_gate[:self.n_active]

    def up_rows(self) -> torch.Tensor:
        return self.pool_up[:self.n_active]

    def down_t_rows(self) -> torch.Tensor:
        """Columns of down held by the valid slots, as rows [n, H] (down^T layout)."""
        return self.pool_down_t[:self.n_active]

    def nbytes(self) -> dict:
        """Bytes held: the pool and the cache's source copies."""
        pool = self.pool_gu.nbytes + self.pool_down_t.nbytes
        src = self.src_gate.nbytes + self.src_up.nbytes + self.src_down_t.nbytes
        return {"pool": pool, "source": src, "maps": self._maps.nbytes + self._prev.nbytes}

    def __repr__(self) -> str:
        return (f"DifferentialWeightCache(I={self.intermediate_size}, H={self.hidden_size}, "
                f"capacity={self.capacity}, n_active={self.n_active}, dtype={self.dtype}, "
                f"interleave={self.interleave})")
