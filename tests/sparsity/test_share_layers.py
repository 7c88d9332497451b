import json

import pytest
import torch
from typer.testing import CliRunner

from rarefy.cli import app
from rarefy.engine.generate import Generator
from rarefy.errors import RarefyError
from rarefy.layers.sampler import SamplingParams
from rarefy.models.loader import load_model
from rarefy.sparsity.share_layers import share_layers
from tests.conftest import VOCAB


def _fresh(path):
    return load_model(path, dtype="fp32", with_tokenizer=False).model


def test_sharing_identical_layers_changes_nothing(tiny_model_dir):
    m = _fresh(tiny_model_dir)
    with torch.no_grad():  # make layer 1 a copy of layer 0
        for (_, p0), (_, p1) in zip(m.model.layers[0].named_parameters(), m.model.layers[1].named_parameters()):
            p1.copy_(p0)
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        before = m(ids)
        saved = share_layers(m, 0, 1, "first")
        after = m(ids)
    assert torch.equal(before, after)
    assert saved["layers_dropped"] == 1 and saved["params_dropped"] > 0
    # one set of parameters now: the module list dedups shared tensors
    assert m.model.layers[1].mlp.down_proj.weight is m.model.layers[0].mlp.down_proj.weight


def test_mean_mode_averages_and_cache_rows_stay_distinct(tiny_model_dir):
    m = _fresh(tiny_model_dir)
    w0 = m.model.layers[0].mlp.up_proj.weight.clone()
    w1 = m.model.layers[1].mlp.up_proj.weight.clone()
    share_layers(m, 0, 1, "mean")
    assert torch.allclose(m.model.layers[0].mlp.up_proj.weight, (w0 + w1) / 2)
    assert [l.self_attn.layer_idx for l in m.model.layers] == [0, 1]
    # cached decode agrees with a full forward: each position keeps its own KV rows
    prompt = torch.randint(3, VOCAB, (6,)).tolist()
    (c,), _ = Generator(m, None).generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))
    ids = torch.tensor([prompt + c.token_ids[:-1]])
    with torch.no_grad():
        greedy = m(ids)[0, len(prompt) - 1:].argmax(-1).tolist()
    assert greedy == c.token_ids


def test_bad_spans(tiny_model_dir):
    m = _fresh(tiny_model_dir)
    for start, end in [(1, 1), (1, 0), (-1, 1), (0, 2)]:
        with pytest.raises(RarefyError):
            share_layers(m, start, end)
    with pytest.raises(RarefyError, match="--mode"):
        share_layers(m, 0, 1, "median")


def test_cli(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    r = CliRunner().invoke(app, ["experiment", "share-layers", "--model", str(tiny_model_dir), "--start", "0",
                                 "--end", "1", "--text", str(text), "--ctx", "32", "--chunks", "3", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["ppl_original"] > 1 and d["ppl_shared"] > 1 and d["ppl_shared"] != d["ppl_original"]
    bad = CliRunner().invoke(app, ["experiment", "share-layers", "--model", str(tiny_model_dir), "--start", "0",
                                   "--end", "5", "--text", str(text)])
    assert bad.exit_code == 1 and "error:" in bad.output and "Traceback" not in bad.output
