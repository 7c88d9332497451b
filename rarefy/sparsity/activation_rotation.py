"""Orthogonal rotations of the sparsified inputs, folded into the weights.

Activation sparsity drops the small entries of a projection input x. In another orthonormal
basis, x' = x R (R orthogonal, row vectors), the same vector may have its energy in fewer
entries, and W x = (W R) x': the projection reads x' through W R, so the rotation costs
nothing where R can be folded into the weights on both sides. Three rotations (after
SliceGPT / QuaRot, which rotate the residual stream for pruning / quantisation, and WINA,
whose criterion is exact when the weight columns are orthogonal; LaRoSa rotates per layer
for activation sparsity):

``vo`` (o_in, free at run time). Per key/value head g, a [head_dim, head_dim] R_g: v_proj's
rows of head g become R_g^T W_v,g, so the values, and hence every attention output head
that reads them (grouped-query heads share R_g), come out rotated; o_proj's columns of each
of those heads become W_o,h R_g. Exact; no run-time cost.

``residual`` (attn_in and mlp_in, free at run time). One d x d Q for the whole residual
stream: embeddings E Q; every RMSNorm gain g is folded into the projections that read the
norm (W diag(g) Q) and set to 1, because RMSNorm(h Q) = RMSNorm(h) Q only without a gain;
o_proj and down_proj write Q^T W; the head becomes W_head diag(g_final) Q, so tied embeddings
are untied (one more vocab x d matrix stored; the head reads the same bytes per token). The
sparsified attn_in / mlp_in is then the gain-free normalised stream in the rotated basis.

``layer`` (attn_in and mlp_in, with a run-time cost). Each layer's normalised input gets its
own R: the RMSNorm is followed by x @ R (a d x d matmul per input and token, i.e. 2 d^2
multiply-adds per layer: 0.66 M for the embedded model's layer of 3.5 M, +19% of its dense
projection work), and the reading projections hold W R. This is the upper bound the free
``residual`` rotation approximates with one Q for all layers.

Bases (``basis``): ``pca``, the eigenvectors of the input's second moment E[x^T x] (largest
first; concentrates the energy, so fewer entries carry it), or ``svd``, the eigenvectors of
W^T W for the weights reading the input (their columns become orthogonal, WINA's
assumption; best with the weighted criterion).
"""

from __future__ import annotations

import torch
from torch import nn

from rarefy.errors import RarefyError

KINDS = ("vo", "residual", "layer")
BASES = ("pca", "svd")


def _w(m: nn.Module) -> torch.Tensor:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise RarefyError(f"rotations need dense projection weights; {type(m).__name__} has none")
    return w


def _set(m: nn.Module, w: torch.Tensor) -> None:
    old = _w(m)
    m.weight = nn.Parameter(w.to(old.dtype).contiguous(), requires_grad=False)


def _projs(layer, which: str) -> list[nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    if which == "attn":
        if getattr(attn, "qkv_proj", None) is not None:
            return [attn.qkv_proj]
        return [attn.q_proj, attn.k_proj, attn.v_proj]
    if getattr(mlp, "gate_up_proj", None) is not None:
        return [mlp.gate_up_proj]
    return [mlp.gate_proj, mlp.up_proj]


def _eig_desc(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal eigenvectors of a symmetric matrix as columns, largest eigenvalue first."""
    vals, vecs = torch.linalg.eigh(m.double())
    return vecs[:, vals.argsort(descending=True)].float()


@torch.no_grad()
def second_moments(model, windows: list[list[int]]) -> dict:
    """E[x^T x] of every layer's attention and MLP input (after the RMSNorm, gain included),
    of the gain-free normalised stream summed over both (for ``residual``), and per key/value
    head of the attention output heads that read it (o_in)."""
    from rarefy.sparsity.activation import decoder_layers

    layers = decoder_layers(model)
    cfg = model.config
    hd, nkv, nh = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    acc = {"attn": [0.0] * len(layers), "mlp": [0.0] * len(layers), "o": [0.0] * len(layers),
           "stream": 0.0, "tokens": 0}

    def site(i, key, norm):
        def pre(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[key][i] = acc[key][i] + x.t() @ x
            g = norm.weight.detach().double()
            xs = x / torch.where(g.abs() < 1e-12, torch.full_like(g, 1e-12), g)
            acc["stream"] = acc["stream"] + xs.t() @ xs
        return pre

    def o_site(i):
        def pre(mod, args):
            x = args[0].detach().double().reshape(-1, nh, hd)
            group = torch.arange(nh) // (nh // nkv)
            m = torch.stack([torch.einsum("thd,the->de", x[:, group == g], x[:, group == g])
                             for g in range(nkv)])
            acc["o"][i] = acc["o"][i] + m
        return pre

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.register_forward_pre_hook(site(i, "attn", layer.input_layernorm)))
        handles.append(layer.mlp.register_forward_pre_hook(site(i, "mlp", layer.post_attention_layernorm)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_site(i)))
    device = next(model.parameters()).device
    try:
        for w in windows:
            model(torch.tensor([w], device=device))
            acc["tokens"] += len(w)
    finally:
        for h in handles:
            h.remove()
    return acc


def _vo_rotations(model, moments, basis):
    from rarefy.sparsity.activation import decoder_layers

    cfg = model.config
    hd, nkv, nh = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        if basis == "pca":
            out.append([_eig_desc(moments["o"][i][g]) for g in range(nkv)])
        else:
            wo = _w(layer.self_attn.o_proj).float()
            rep = nh // nkv
            out.append([_eig_desc(sum(wo[:, h * hd:(h + 1) * hd].t() @ wo[:, h * hd:(h + 1) * hd]
                                      for h in range(g * rep, (g + 1) * rep)))
                        for g in range(nkv)])
    return out


@torch.no_grad()
def rotate_vo(model, rotations) -> None:
    """Fold per key/value head rotations R_g into v_proj (rows) and o_proj (columns)."""
    from rarefy.sparsity.activation import decoder_layers

    cfg = model.config
    hd, nkv, nh = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    rep = nh // nkv
    for layer, rs in zip(decoder_layers(model), rotations):
        attn = layer.self_attn
        if getattr(attn, "qkv_proj", None) is not None:
            raise RarefyError("rotate the model before fusing q/k/v")
        if getattr(attn.v_proj, "bias", None) is not None or getattr(attn.o_proj, "bias", None) is not None:
            raise RarefyError("the v/o rotation does not handle v_proj / o_proj biases")
        wv, wo = _w(attn.v_proj).float().clone(), _w(attn.o_proj).float().clone()
        for g, r in enumerate(rs):
            wv[g * hd:(g + 1) * hd] = r.t() @ wv[g * hd:(g + 1) * hd]
            for h in range(g * rep, (g + 1) * rep):
                wo[:, h * hd:(h + 1) * hd] = wo[:, h * hd:(h + 1) * hd] @ r
        _set(attn.v_proj, wv)
        _set(attn.o_proj, wo)


class RotatedNorm(nn.Module):
    """RMSNorm followed by x @ R: the online rotation of the ``layer`` kind."""

    def __init__(self, norm: nn.Module, rotation: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.rotation = nn.Parameter(rotation.detach().float().contiguous(), requires_grad=False)

    @property
    def weight(self):  # the RMSNorm gain, for code that folds into it
        return self.norm.weight

    def forward(self, h):
        return self.norm(h) @ self.rotation.to(h.dtype)


def _block_eig(m: torch.Tensor, block: int | None) -> torch.Tensor:
    """_eig_desc of m, or block-diagonal: each run of `block` channels rotated on its own."""
    d = m.shape[0]
    if not block or block >= d:
        return _eig_desc(m)
    r = torch.zeros(d, d)
    for a in range(0, d, block):
        b = min(a + block, d)
        r[a:b, a:b] = _eig_desc(m[a:b, a:b])
    return r


@torch.no_grad()
def rotate_layers(model, moments, basis: str, block: int | None = None) -> None:
    """Per layer, rotate the normalised attention and MLP inputs (online; see module doc).
    ``block``: block-diagonal rotations of `block` channels (run-time cost d * block per input
    and token instead of d^2)."""
    from rarefy.sparsity.activation import decoder_layers

    for i, layer in enumerate(decoder_layers(model)):
        for which, norm_name in (("attn", "input_layernorm"), ("mlp", "post_attention_layernorm")):
            ps = _projs(layer, which)
            if basis == "pca":
                r = _block_eig(moments[which][i], block)
            else:
                r = _block_eig(sum(_w(p).float().t() @ _w(p).float() for p in ps), block)
            for p in ps:
                _set(p, _w(p).float() @ r)
            setattr(layer, norm_name, RotatedNorm(getattr(layer, norm_name), r))


@torch.no_grad()
def rotate_residual(model, moments, basis: str) -> None:
    """One rotation Q of the residual stream, folded into every weight (see module doc)."""
    from rarefy.sparsity.activation import decoder_layers

    layers = decoder_layers(model)
    if basis == "pca":
        q = _eig_desc(moments["stream"])
    else:  # eigenvectors of the summed Gram matrices of every reading projection, gains folded
        gram = 0.0
        for layer in layers:
            for which, norm in (("attn", layer.input_layernorm), ("mlp", layer.post_attention_layernorm)):
                for p in _projs(layer, which):
                    w = _w(p).float() * norm.weight.float()
                    gram = gram + w.t() @ w
        q = _eig_desc(gram)
    body = model.model
    emb = body.embed_tokens.weight
    head_w = _w(model.lm_head).float().clone()
    if getattr(model.lm_head, "bias", None) is not None:
        raise RarefyError("the residual rotation does not handle an LM head bias")
    body.embed_tokens.weight = nn.Parameter((emb.float() @ q).to(emb.dtype), requires_grad=False)
    model.lm_head.weight = nn.Parameter(((head_w * body.norm.weight.float()) @ q).to(_w(model.lm_head).dtype),
                                        requires_grad=False)
    body.norm.weight.fill_(1.0)
    if hasattr(model, "config"):
        try:
            model.config.tie_word_embeddings = False
        except (AttributeError, TypeError):  # a frozen config: the weights are untied all the same
            pass
    for layer in layers:
        for which, norm in (("attn", layer.input_layernorm), ("mlp", layer.post_attention_layernorm)):
            for p in _projs(layer, which):
                _set(p, (_w(p).float() * norm.weight.float()) @ q)
            norm.weight.fill_(1.0)
        for p in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if getattr(p, "bias", None) is not None:
                raise RarefyError("the residual rotation does not handle o_proj / down_proj biases")
            _set(p, q.t() @ _w(p).float())


def check_rotation(kinds, basis: str) -> list[str]:
    kinds = [k for k in kinds if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise RarefyError(f"unknown rotation {bad[0]!r}; known: {', '.join(KINDS)}")
    if "residual" in kinds and "layer" in kinds:
        raise RarefyError("choose one of the residual and layer rotations")
    if basis not in BASES:
        raise RarefyError(f"unknown rotation basis {basis!r}; known: {', '.join(BASES)}")
    return kinds


def rotate_model(model, kinds, windows: list[list[int]] | None = None, basis: str = "pca",
                 block: int | None = None) -> dict:
    """Apply the rotations `kinds` (subset of KINDS) in place; `windows` (token lists) give the
    second moments for the pca basis. Returns a summary."""
    kinds = check_rotation(kinds, basis)
    moments = None
    if basis == "pca" and kinds:
        if not windows:
            raise RarefyError("the pca rotation basis needs calibration windows")
        moments = second_moments(model, windows)
    if "vo" in kinds:
        rotate_vo(model, _vo_rotations(model, moments, basis))
    if "residual" in kinds:
        rotate_residual(model, moments, basis)
    if "layer" in kinds:
        rotate_layers(model, moments, basis, block)
    return {"kinds": kinds, "basis": basis, "block": block, "tokens": moments["tokens"] if moments else 0}


# -- the v/o rotation carried by a calibration file (format 4: a safetensors sidecar) -------

SIDECAR = "activation_rotation.safetensors"
SIDECAR_FORMAT = "rarefy-activation-rotation"
ORTHOGONAL_TOL = 1e-3  # max |R^T R - I| accepted from a file (fp32 eigenvectors reach ~1e-6)


def compute_vo_rotations(model, windows: list[list[int]] | None, basis: str = "pca") -> list[list[torch.Tensor]]:
    """The per key/value head rotations ``rotate_vo`` folds (pca basis from `windows`, token
    lists), one list of [head_dim, head_dim] fp32 matrices per decoder layer; the model is
    not changed."""
    check_rotation(["vo"], basis)
    moments = None
    if basis == "pca":
        if not windows:
            raise RarefyError("the pca rotation basis needs calibration windows")
        moments = second_moments(model, windows)
    return _vo_rotations(model, moments, basis)


def vo_shape(model) -> tuple[int, int, int]:
    cfg = model.config
    return cfg.num_kv_heads, cfg.head_dim, cfg.head_dim


def save_vo_rotations(path, rotations: list[list[torch.Tensor]], kind: str = "vo") -> str:
    """Write the rotations to a safetensors file (tensor ``layers.{i}.vo``, [kv heads,
    head_dim, head_dim] fp32), through a temporary file renamed into place; returns the
    file's sha256."""
    import hashlib
    import os

    from safetensors.torch import save_file

    tensors = {f"layers.{i}.vo": torch.stack([r.detach().float().cpu() for r in rs]).contiguous()
               for i, rs in enumerate(rotations)}
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"format": SIDECAR_FORMAT, "kind": kind, "layers": str(len(rotations))})
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return digest


def load_vo_rotations(path, sha256: str | None = None, model=None) -> list[list[torch.Tensor]]:
    """Read a sidecar written by ``save_vo_rotations``; checks its checksum (when given), that
    every matrix is finite and orthogonal, and, with `model`, the layer count and shapes.
    Any problem is one RarefyError naming the file."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise RarefyError(f"rotation sidecar {path} is missing: a version 4 calibration keeps its v/o rotation "
                          "there (copy the whole directory that calibrate-activations wrote)") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise RarefyError(f"rotation sidecar {path} does not match its calibration file (checksum differs): "
                          "it belongs to another calibration")
    try:
        tensors = load_bytes(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise RarefyError(f"rotation sidecar {path} is not a safetensors file ({e})") from None
    n = len(tensors)
    if set(tensors) != {f"layers.{i}.vo" for i in range(n)}:
        raise RarefyError(f"rotation sidecar {path} must hold layers.0.vo ... layers.{n - 1}.vo, "
                          f"got {', '.join(sorted(tensors)[:3])}")
    if model is not None:
        from rarefy.sparsity.activation import decoder_layers
        layers = len(decoder_layers(model))
        if n != layers:
            raise RarefyError(f"rotation sidecar {path} has {n} layers, this model {layers} "
                              "(calibrated on another model?)")
    want = vo_shape(model) if model is not None else None
    out = []
    for i in range(n):
        t = tensors[f"layers.{i}.vo"]
        shape = tuple(t.shape)
        if len(shape) != 3 or shape[1] != shape[2] or (want is not None and shape != want):
            raise RarefyError(f"rotation sidecar {path}: layers.{i}.vo has shape {list(shape)}, this model needs "
                              f"{list(want) if want else '[kv_heads, head_dim, head_dim]'} (mismatched shapes: "
                              "calibrated on another model?)")
        t = t.float()
        eye = torch.eye(shape[1])
        if not torch.isfinite(t).all() or float((t.transpose(1, 2) @ t - eye).abs().max()) > ORTHOGONAL_TOL:
            raise RarefyError(f"rotation sidecar {path}: layers.{i}.vo is not orthogonal")
        out.append(list(t.unbind(0)))
    return out


def apply_vo_rotations(model, rotations: list[list[torch.Tensor]], tag: str | None = None) -> bool:
    """Fold a calibration's v/o rotation into the model, once: a model already rotated with
    the same `tag` (the sidecar checksum) is left alone (returns False); one rotated by
    another calibration is refused."""
    done = getattr(model, "_rarefy_vo_rotation", None)
    if done is not None:
        if tag is not None and done == tag:
            return False
        raise RarefyError("this model already carries another calibration's v/o rotation")
    want = vo_shape(model)
    from rarefy.sparsity.activation import decoder_layers
    if len(rotations) != len(decoder_layers(model)) or any(
            len(rs) != want[0] or any(tuple(r.shape) != want[1:] for r in rs) for rs in rotations):
        raise RarefyError(f"the v/o rotation does not fit this model (needs {len(decoder_layers(model))} layers "
                          f"of {want[0]} matrices {want[1]}x{want[2]})")
    rotate_vo(model, [[r.to(_w(layer.self_attn.v_proj).device) for r in rs]
                      for layer, rs in zip(decoder_layers(model), rotations)])
    try:
        model._rarefy_vo_rotation = tag or "unnamed"
    except AttributeError:
        pass
    return True
