"""Shared fixtures: small random checkpoints written with transformers' save_pretrained."""

import os

import pytest
import torch

# Without a GPU every Triton kernel runs under the interpreter. Set it before any test
# module imports rarefy: @triton.jit reads it when a kernel module is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
WIKITEXT_VALID = os.path.abspath(os.path.join(SHARED_DATA, "wikitext-2", "valid.txt"))

VOCAB = 320


def _hf_config(kind: str):
    import transformers as tf
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2)
    if kind == "llama3":
        return tf.LlamaForCausalLM, tf.LlamaConfig(
            **base, rope_theta=500000.0, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "llama_tied":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**base, tie_word_embeddings=True)
    if kind == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**base)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**base, tie_word_embeddings=True)
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(**base, head_dim=32)
    raise ValueError(kind)


ARCHS = ["llama3", "llama_tied", "mistral", "qwen2", "qwen3"]


def make_random_checkpoint(kind: str, path, seed: int = 0):
    """Write a random HF checkpoint; returns the transformers model (fp32, eval)."""
    cls, cfg = _hf_config(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so logits are not flat
            p.normal_(0.0, 0.2)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session", params=ARCHS)
def random_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_random_checkpoint(request.param, path)


@pytest.fixture(scope="session")
def embedded_model_path():
    from rarefy.models.default_model import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def embedded_model():
    from rarefy.models.loader import load_model
    return load_model(None, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_embedded_model(embedded_model_path):
    """transformers' own reading of the embedded GGUF: the reference model."""
    import transformers as tf
    d, f = os.path.split(embedded_model_path)
    return tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def write_tiny_tokenizer(path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE trained on a few sentences, with <s> = 1 and </s> = 2."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "Sparse models run fast.",
            "Perplexity measures how surprised a model is by text."] * 20
    tk.train_from_iterator(text, trainer)
    tk.save(str(path / "tokenizer.json"))
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                   "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                                    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"},
                  f)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random Llama checkpoint with a working tokenizer: fast end-to-end CLI runs."""
    path = tmp_path_factory.mktemp("tiny")
    make_random_checkpoint("llama3", path)
    write_tiny_tokenizer(path)
    return path


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly on machines without CUDA (CI is CPU-only)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
