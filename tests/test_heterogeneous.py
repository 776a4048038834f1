"""Pruning a model again after compaction: per-layer widths are read off each layer's modules (its per-layer config
refuses global reads), masked logits equal compacted logits at every step, a per-layer export prunes again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import calib, tiny_model

import pruning
from pruning.structure import ModelStructure

ATOL = 1e-5
GQA_STEPS = [("query_head", [0.0, 0.5, 0.5]), ("mlp_neuron", [0.25, 0.5, 0.0]), ("attention_head", [0.5, 0.0, 0.0])]
MHA_STEPS = [
    ("attention_head", [0.0, 0.5, 0.25]),
    ("mlp_neuron", [0.25, 0.5, 0.0]),
    ("attention_head", [0.5, 0.0, 0.0]),
]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _widths(model) -> list[tuple[int, int, int]]:
    s = ModelStructure(model)
    return [(s.heads(i), s.kv_heads(i), s.intermediate(i)) for i in range(s.num_layers)]


def _step(model, granularity, rates, ids):
    res = pruning.prune(
        model,
        calib(),
        method="wanda",
        sparsity=0.5,
        granularity=granularity,
        allocation="rates",
        layer_rates=rates,
        progress=False,
    )
    masked = _logits(model, ids)
    before = sum(p.numel() for p in model.parameters())
    pruning.compact(model, res.masks)
    torch.testing.assert_close(_logits(model, ids), masked, atol=ATOL, rtol=0)
    assert sum(p.numel() for p in model.parameters()) < before


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "opt", "gpt_neox"])
def test_prune_compact_prune_compact(family):
    model = tiny_model(family, layers=3)
    ids = calib(2, 12, seed=1)[0]
    steps = MHA_STEPS if family in ("opt", "gpt_neox") else GQA_STEPS
    widths = [_widths(model)]
    for granularity, rates in steps:
        _step(model, granularity, rates, ids)
        assert model.config.is_heterogeneous
        widths.append(_widths(model))
    # each step changed what it pruned, in the layers its rates name
    heads, kv = [w[0] for w in widths[-1]], [w[1] for w in widths[-1]]
    assert heads[0] < 4 and heads[1] < 4 and widths[2][1][2] < 64
    assert kv[0] <= 2 or family in ("opt", "gpt_neox")
    with pytest.raises(Exception, match="per-layer|per_layer|Ambiguous"):
        _ = model.config.num_attention_heads  # the global read ModelStructure no longer makes


def test_per_layer_export_prunes_again(tmp_path: Path):
    model = tiny_model("phi3", layers=3)
    ids = calib(2, 12, seed=1)[0]
    _step(model, "query_head", [0.0, 0.5, 0.5], ids)
    pruning.save_pretrained(model, tmp_path / "export")
    loaded = pruning.load_pretrained(tmp_path / "export", attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=ATOL, rtol=0)
    assert _widths(loaded) == _widths(model)
    _step(loaded, "mlp_neuron", [0.5, 0.25, 0.0], ids)
    _step(loaded, "attention_head", [0.0, 0.5, 0.0], ids)
    assert _widths(loaded)[1][1] == 1
