"""One decoder for Llama 1/2/3, Mistral, Qwen2, Qwen3 and SmolLM/SmolLM2.

Parameter names follow HF checkpoints (model.layers.N.self_attn.q_proj.weight,
...), so a state dict loads without renaming. Every projection is a swappable
linear module (rarefy.layers.linear).
"""

from __future__ import annotations

import torch
from torch import nn

from rarefy.config import ModelConfig
from rarefy.layers.attention import Attention
from rarefy.layers.linear import DenseLinear
from rarefy.layers.mlp import MLP
from rarefy.layers.norm import RMSNorm
from rarefy.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, positions, cache, kv_len, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, cache, kv_len, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = DenseLinear(cfg.hidden_size, cfg.vocab_size)
        # Rope tables are derived, not loaded (the loader rebuilds them on the
        # target device after a meta-device init).
        self.rotary = RotaryEmbedding(cfg)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Stack q/k/v and gate/up weights (dense, or low-bit of one kind) for faster decode."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, kv_len: int | None = None,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `input_ids`.

        input_ids, positions: [B, T] int64 (positions default to 0..T-1).
        cache: a StaticKVCache (keys/values are written at `positions` and attention
            reads its first `kv_len` slots, default all) or a PagedKVCache after its
            begin_step() for this batch (kv_len unused).
        last_index: [B] int64 (or [R] when B == 1: several indices of one packed row);
            if given, only the hidden state at that index of
            each row goes through the head and the result is [B, vocab].
        Returns float logits [B, T, vocab] (or [B, vocab]) in the model dtype.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = None
        if cache is not None:
            kv_len = getattr(cache, "max_seq", None) if kv_len is None else kv_len
            mask = cache.make_mask(positions, kv_len)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, positions, cache, kv_len, mask)
        if last_index is not None:
            h = h[torch.arange(B, device=h.device), last_index]
        return self.lm_head(self.model.norm(h))
