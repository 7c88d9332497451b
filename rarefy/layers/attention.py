"""Grouped-query self-attention with optional q/k bias (Qwen2) and q/k RMSNorm (Qwen3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from rarefy.config import ModelConfig
from rarefy.layers.linear import DenseLinear, fuse_dense
from rarefy.layers.norm import RMSNorm
from rarefy.layers.rotary import apply_rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = DenseLinear(d, cfg.q_size, bias)
        self.k_proj = DenseLinear(d, cfg.kv_size, bias)
        self.v_proj = DenseLinear(d, cfg.kv_size, bias)
        self.o_proj = DenseLinear(cfg.q_size, d, False)
        self.qkv_proj: nn.Module | None = None  # set by fuse_projections()
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # Optional replacement for causal SDPA when there is no cache (full-context
        # forward, as in perplexity evaluation): called as fn(q, k, v, positions) with
        # q [B, Hq, T, D], k/v [B, Hkv, T, D] after rotary, positions [B, T]; returns
        # [B, Hq, T, D]. rarefy.kv.simulate uses it to evaluate KV dtypes and policies.
        self.eval_attention = None

    def fuse_projections(self) -> None:
        """Replace q/k/v with one stacked projection (dense, or low-bit layers of one kind)."""
        if self.qkv_proj is not None:
            return
        parts = [self.q_proj, self.k_proj, self.v_proj]
        if all(isinstance(m, DenseLinear) for m in parts):
            self.qkv_proj = fuse_dense(parts)
        else:
            from rarefy.layers.lowbit_linear import fuse_lowbit
            self.qkv_proj = fuse_lowbit(parts)
        if self.qkv_proj is not None:
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, positions, cache=None, kv_len=None, mask=None):
        """x: [B, T, hidden]; positions: [B, T]; mask: [B, 1, T, kv_len] bool or None (causal)."""
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin).transpose(1, 2)
        k = apply_rotary(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v, positions, kv_len, mask)
        elif self.eval_attention is not None:
            out = self.eval_attention(q, k, v, positions)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.q_size))
