"""Read a GGUF checkpoint as if it were an HF one.

`GGUFCheckpoint` exposes an HF config.json-style dict, HF parameter names and tensors in HF
layout, so the rest of the engine never sees llama.cpp conventions. Tensors stay in the
memory-mapped file until `load()` dequantizes one of them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from rarefy.errors import RarefyError
from rarefy.models.gguf_tokenizer import build_tokenizer_json

try:
    import gguf
    from gguf.quants import dequantize
except ImportError:  # pragma: no cover - gguf is a declared dependency
    gguf = None

# GGUF architecture -> (HF architectures entry, HF model_type)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Llama 3.x GGUFs carry their rope scaling as this precomputed tensor instead of metadata.
_ROPE_FREQS = "rope_freqs.weight"

# Every Llama 3.x checkpoint was scaled from an 8k context. The value only labels the
# inferred parameters: the frequencies they produce do not depend on it.
_LLAMA3_DEFAULT_ORIGINAL_CONTEXT = 8192


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    return None


def _undo_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation.

    The converter interleaves each head's two rotary halves (row order h, i, half ->
    h, half, i) so GGML's pairwise rope applies; HF's rotate_half wants them back as
    two contiguous halves per head.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def infer_llama3_rope_scaling(
    factors: np.ndarray, rope_theta: float, head_dim: int, original_context: int
) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's per-frequency divisors.

    The converter computed, per rotary frequency, 1 (short wavelengths), `factor` (long
    ones) or `1 / ((1 - s) / factor + s)` in between, where the smoothing s is linear in
    1/wavelength. A line fitted through s at the in-between frequencies gives low/high
    frequency factors that reproduce the same frequencies.
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if len(inv_freq) != len(factors):
        raise RarefyError(f"rope_freqs has {len(factors)} entries, expected {len(inv_freq)}")
    between = (factors > 1.0 + 1e-4) & (factors < factor - 1e-4)
    if between.sum() < 2:
        raise RarefyError("cannot infer llama3 rope scaling from rope_freqs: too few smoothed frequencies")
    smooth = (factor / factors[between] - 1.0) / (factor - 1.0)
    x = inv_freq[between] / (2 * math.pi)  # 1 / wavelength
    slope, intercept = np.polyfit(x, smooth, 1)
    if np.abs(slope * x + intercept - smooth).max() > 1e-3 or slope <= 0:
        raise RarefyError("rope_freqs tensor does not follow llama3 rope scaling")
    span = original_context / slope  # high_freq_factor - low_freq_factor
    low = -intercept * span
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": round(float(low), 4),
        "high_freq_factor": round(float(low + span), 4),
        "original_max_position_embeddings": int(original_context),
    }


class GGUFCheckpoint:
    """A llama/qwen2/qwen3 GGUF file seen through HF names, layouts and config keys."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if gguf is None:
            raise RarefyError("reading GGUF files needs the 'gguf' package (pip install gguf)")
        if not os.path.exists(self.path):
            raise RarefyError(f"GGUF file not found: {self.path}")
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise RarefyError(f"cannot read GGUF file {self.path}: {exc.strerror or exc}") from exc
        if magic != b"GGUF":
            raise RarefyError(f"{self.path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # the reader reports damage with many exception types
            raise RarefyError(
                f"{self.path} is truncated or corrupt: cannot parse GGUF ({type(exc).__name__}: {exc})"
            ) from exc

        self.architecture = self.metadata("general.architecture")
        if self.architecture not in _ARCHITECTURES:
            raise RarefyError(
                f"unsupported architecture '{self.architecture}' in {self.path} "
                f"(supported: {', '.join(_ARCHITECTURES)})"
            )

        self._tensors: dict[str, Any] = {}
        self._rope_freqs = None
        for tensor in self._reader.tensors:
            self._check_tensor_bytes(tensor)
            if tensor.name == _ROPE_FREQS and self.architecture == "llama":
                self._rope_freqs = tensor
                continue
            hf_name = _hf_name(tensor.name)
            if hf_name is None:
                raise RarefyError(f"unsupported tensor '{tensor.name}' in {self.path}")
            self._tensors[hf_name] = tensor
        self._check_dequantizable()

        self.bos_token_id: int | None = self.metadata("tokenizer.ggml.bos_token_id")
        self.eos_token_id: int | None = self.metadata("tokenizer.ggml.eos_token_id")
        add_bos = self.metadata("tokenizer.ggml.add_bos_token")
        # llama.cpp prepends BOS for sentencepiece vocabularies unless told otherwise.
        self.add_bos_token: bool = bool(add_bos) if add_bos is not None else (
            self.metadata("tokenizer.ggml.model") == "llama"
        )
        self.chat_template: str | None = self.metadata("tokenizer.chat_template")
        self.config_dict: dict[str, Any] = self._build_config()
        self._tokenizer_json: str | None = None

    # -- metadata ---------------------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        """The value of GGUF metadata `key` (e.g. "general.name"), or `default` when absent."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except Exception as exc:
            raise RarefyError(f"{self.path}: unreadable GGUF metadata '{key}' ({exc})") from exc
        if field.types and field.types[-1] == gguf.GGUFValueType.FLOAT32:
            # float32 storage turns 1e-5 into 9.99999974e-06; the shortest float32 repr
            # recovers the decimal value the HF config had.
            if isinstance(value, list):
                return [float(str(np.float32(v))) for v in value]
            return float(str(np.float32(value)))
        return value

    def _arch_int(self, key: str, default: int | None = None) -> int:
        value = self.metadata(f"{self.architecture}.{key}", default)
        if isinstance(value, list):
            # Per-layer values (hybrid models) are fine only when they are all equal.
            if not value or len(set(value)) != 1:
                raise RarefyError(f"{self.path}: per-layer '{self.architecture}.{key}' is not supported")
            value = value[0]
        if value is None:
            raise RarefyError(f"{self.path}: GGUF metadata '{self.architecture}.{key}' is missing")
        return int(value)

    def _build_config(self) -> dict[str, Any]:
        arch = self.architecture
        hidden = self._arch_int("embedding_length")
        heads = self._arch_int("attention.head_count")
        kv_heads = self._arch_int("attention.head_count_kv", heads)
        head_dim = self._arch_int("attention.key_length", hidden // heads)
        rope_dims = self.metadata(f"{arch}.rope.dimension_count")
        if rope_dims is not None and int(rope_dims) != head_dim:
            raise RarefyError(f"{self.path}: partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise RarefyError(f"{self.path}: GGUF file has no token_embd.weight tensor")
        vocab_size = self.metadata(f"{arch}.vocab_size") or int(embed.shape[1])
        rope_theta = float(self.metadata(f"{arch}.rope.freq_base", 10000.0))
        hf_arch, model_type = _ARCHITECTURES[arch]
        has_qkv_bias = "model.layers.0.self_attn.q_proj.bias" in self._tensors

        config: dict[str, Any] = {
            "architectures": [hf_arch],
            "model_type": model_type,
            "vocab_size": int(vocab_size),
            "hidden_size": hidden,
            "intermediate_size": self._arch_int("feed_forward_length"),
            "num_hidden_layers": self._arch_int("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(self.metadata(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": rope_theta,
            "max_position_embeddings": self._arch_int("context_length", 2048),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            # Qwen2 always has q/k/v biases; llama may, if the file carries them.
            "attention_bias": arch == "qwen2" or has_qkv_bias,
        }
        rope_scaling = self._rope_scaling(head_dim, rope_theta)
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
        return config

    def _rope_scaling(self, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
        prefix = f"{self.architecture}.rope.scaling."
        kind = self.metadata(prefix + "type")
        factor = self.metadata(prefix + "factor")
        original = self.metadata(prefix + "original_context_length")
        if self._rope_freqs is not None:
            factors = dequantize(self._rope_freqs.data, self._rope_freqs.tensor_type).reshape(-1)
            return infer_llama3_rope_scaling(
                factors, rope_theta, head_dim, int(original or _LLAMA3_DEFAULT_ORIGINAL_CONTEXT)
            )
        if kind in (None, "none") or factor is None:
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            scaling = {"rope_type": "yarn", "factor": float(factor)}
            if original is not None:
                scaling["original_max_position_embeddings"] = int(original)
            for key in ("beta_fast", "beta_slow"):
                value = self.metadata(prefix + "yarn_" + key)
                if value is not None:
                    scaling[key] = float(value)
            return scaling
        raise RarefyError(f"{self.path}: unsupported rope scaling type '{kind}'")

    # -- tensors ----------------------------------------------------------------------

    def _check_tensor_bytes(self, tensor: Any) -> None:
        if tensor.data.nbytes != tensor.n_bytes or tensor.data_offset + tensor.n_bytes > len(self._reader.data):
            raise RarefyError(f"{self.path} is truncated or corrupt: tensor '{tensor.name}' lies past the end")

    def _check_dequantizable(self) -> None:
        """Fail at open, not halfway through loading, on a type gguf cannot dequantize."""
        seen = set()
        for tensor in [*self._tensors.values(), *([self._rope_freqs] if self._rope_freqs is not None else [])]:
            if tensor.tensor_type in seen:
                continue
            seen.add(tensor.tensor_type)
            sample = tensor.data.reshape(-1, tensor.data.shape[-1])[:1]
            self._dequantize(tensor, sample)

    def _dequantize(self, tensor: Any, data: np.ndarray) -> np.ndarray:
        try:
            return dequantize(data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise RarefyError(
                f"{self.path}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, "
                "which cannot be dequantized"
            ) from exc

    def tensor_names(self) -> list[str]:
        """HF parameter names of every tensor in the file (rope_freqs excluded: it is config)."""
        return list(self._tensors)

    def _tensor(self, hf_name: str) -> Any:
        try:
            return self._tensors[hf_name]
        except KeyError:
            raise KeyError(f"{hf_name!r} is not a tensor of {self.path}") from None

    def tensor_dtype_name(self, hf_name: str) -> str:
        """The GGUF storage type, e.g. 'Q4_1', 'Q8_0', 'F32'."""
        return self._tensor(hf_name).tensor_type.name

    def load(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor, dequantized to float32 then cast to `dtype`, in HF layout."""
        tensor = self._tensor(hf_name)
        values = self._dequantize(tensor, tensor.data)
        # GGUF lists dimensions innermost first; torch wants outermost first.
        values = values.reshape([int(d) for d in reversed(tensor.shape.tolist())])
        if self.architecture == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = self.config_dict["num_attention_heads" if ".q_proj." in hf_name else "num_key_value_heads"]
            if values.shape[0] % (2 * heads):
                raise RarefyError(f"{self.path}: tensor '{tensor.name}' has {values.shape[0]} rows, not a multiple of 2 x {heads} heads")
            values = _undo_rope_permute(values, heads)
        if not values.flags.writeable:
            values = values.copy()  # F32 tensors come back as views of the read-only memmap
        return torch.from_numpy(values).to(dtype)

    # -- tokenizer --------------------------------------------------------------------

    def tokenizer_json(self) -> str:
        """A `tokenizers.Tokenizer` JSON string rebuilt from tokenizer.ggml.* metadata.

        Its post-processor adds BOS/EOS on `encode(add_special_tokens=True)` only when the
        file's add_bos_token/add_eos_token flags ask for it.
        """
        if self._tokenizer_json is None:
            self._tokenizer_json = build_tokenizer_json(self.metadata, self.path)
        return self._tokenizer_json

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({self.path!r}, architecture={self.architecture!r}, tensors={len(self._tensors)})"
