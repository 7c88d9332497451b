"""Model configuration: one frozen dataclass for every supported decoder.

Llama 1/2/3, Mistral, Qwen2, Qwen3 and SmolLM/SmolLM2 differ only in a few
switches (q/k/v bias, q/k RMSNorm, rope scaling, tied embeddings), so one
config and one model class cover them all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from rarefy.errors import RarefyError

# HF model_type -> (q/k/v bias by default, q/k RMSNorm)
SUPPORTED_ARCHITECTURES = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise RarefyError(
                f"unsupported architecture '{self.model_type}' "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise RarefyError(f"invalid model config: {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise RarefyError("invalid model config: num_attention_heads must be a multiple "
                              "of num_key_value_heads")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise RarefyError(f"unsupported rope scaling type '{rope_type}'")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Build from an HF config.json dict (transformers 4.x or 5.x spelling)."""
        model_type = cfg.get("model_type")
        if model_type is None:
            raise RarefyError("config.json has no 'model_type'")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise RarefyError(
                f"unsupported architecture '{model_type}' "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        default_bias, qk_norm = SUPPORTED_ARCHITECTURES[model_type]
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            # transformers 5 folds theta and scaling into rope_parameters
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            if rope.get("rope_type", "default") == "default":
                rope = {}
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=rope or None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", default_bias)),
                qk_norm=qk_norm,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise RarefyError(f"config.json is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise RarefyError(f"config.json has an invalid value: {e}") from None

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise RarefyError(f"no config.json in {path}")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RarefyError(f"cannot read {cfg_path}: {e}") from None
        return cls.from_hf(cfg)
