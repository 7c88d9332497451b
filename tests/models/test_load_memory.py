"""Loading streams tensors: peak RSS grows by about the model's size, not twice it."""

import json
import subprocess
import sys

import pytest


PROBE = r"""
import json, resource, sys, torch
from rarefy.models.loader import load_model
torch.ones(1) @ torch.ones(1)  # bring in torch's lazily loaded pieces before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
lm = load_model(sys.argv[1] if sys.argv[1] != "-" else None, dtype=sys.argv[2], with_tokenizer=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
largest = max(p.numel() * 4 for p in lm.model.parameters())  # one tensor in flight, as fp32
print(json.dumps({"grew": peak - base, "size": size, "largest": largest}))
"""


def peak_growth(model: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, model, dtype], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16w"])
def test_gguf_load_peak_rss(dtype):
    from rarefy.models.default_model import default_model_path
    import os
    r = peak_growth("-", dtype)
    # the model, the mapped file's pages, and a few copies of the tensor being dequantized
    budget = r["size"] + os.path.getsize(default_model_path()) + 3 * r["largest"]
    assert r["grew"] < budget, r


def test_sharded_safetensors_load_peak_rss(tmp_path):
    import transformers as tf
    import torch
    cfg = tf.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    m = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(tmp_path, max_shard_size="20MB")  # sharded with an index
    del m
    assert (tmp_path / "model.safetensors.index.json").exists()
    r = peak_growth(str(tmp_path), "bf16")
    assert r["grew"] < 1.35 * r["size"], r
