"""The demo model ships with the package: the main job's numbers do not depend on a training run (#18 item 1)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pruning.commands.demo import MANIFEST, SHIPPED, demo_config, load_or_train, prepare, train_demo_model
from pruning.evaluation import evaluate_perplexity


def test_shipped_model_is_the_one_its_manifest_describes():
    manifest = json.loads((SHIPPED / MANIFEST).read_text())
    assert hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest() == manifest["model_sha256"]
    model = AutoModelForCausalLM.from_pretrained(SHIPPED).eval()
    want = demo_config()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert getattr(model.config, key) == getattr(want, key)
    assert sum(p.numel() for p in model.parameters()) == 1_016_960
    res = evaluate_perplexity(model, "bytes", "stdlib", batch_size=16)
    assert round(res.ppl, 3) == manifest["heldout_ppl"]["ppl"] == 5.722  # the README's dense row


def test_shipped_tokenizer_loads_like_any_hugging_face_tokenizer():
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    text = "def f(x):\n    return 'é'\n"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(tok(text)["input_ids"]) == text


def test_demo_model_command_copies_once(tmp_path, capsys):
    cache = tmp_path / "demo-model"
    prepare(["--cache", str(cache)])
    assert "shipped demo model" in capsys.readouterr().out
    assert (cache / "model.safetensors").read_bytes() == (SHIPPED / "model.safetensors").read_bytes()
    assert (cache / "tokenizer.json").is_file()
    load_or_train(cache)  # already there: not copied again
    assert "shipped demo model" not in capsys.readouterr().out


def test_training_is_deterministic_for_a_thread_count():
    torch.set_num_threads(1)
    a = train_demo_model(3, log=lambda *_: None)
    b = train_demo_model(3, log=lambda *_: None)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("path", [SHIPPED])
def test_assets_are_package_data(path):
    from pathlib import Path

    import tomllib

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "assets/demo-model/*" in data["tool"]["setuptools"]["package-data"]["pruning"]
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", MANIFEST}
