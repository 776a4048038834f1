"""Fused projections are their unfused twins: a Phi-3 model (``qkv_proj``, ``gate_up_proj``) and the Llama model
holding the same weights in separate q/k/v and gate/up Linears compute the same logits, so every criterion must
give them the same structured masks (statistics, criteria and masks all read the fused slices), and compact the
same model."""

from __future__ import annotations

import pytest
import torch
from tiny import calib, tiny_model

import pruning

HD, HEADS, KV, INTER = 8, 4, 2, 64


def llama_twin(phi3):
    """The Llama model with ``phi3``'s weights, its fused Linears split."""
    llama = tiny_model("llama", layers=len(phi3.model.layers), rms_norm_eps=phi3.config.rms_norm_eps)
    state = {}
    for name, t in phi3.state_dict().items():
        if "qkv_proj" in name:
            q, k, v = t.split([HEADS * HD, KV * HD, KV * HD])
            for part, w in (("q", q), ("k", k), ("v", v)):
                state[name.replace("qkv_proj", f"{part}_proj")] = w
        elif "gate_up_proj" in name:
            gate, up = t.chunk(2)
            state[name.replace("gate_up_proj", "gate_proj")] = gate
            state[name.replace("gate_up_proj", "up_proj")] = up
        else:
            state[name] = t
    llama.load_state_dict(state)
    return llama


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_twin_computes_the_same():
    phi3 = tiny_model("phi3", layers=2)
    ids = calib(2, 12, seed=1)[0]
    torch.testing.assert_close(_logits(llama_twin(phi3), ids), _logits(phi3, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("granularity", ["mlp_neuron", "attention_head", "query_head"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "taylor", "sdm", "saap"])
def test_fused_masks_equal_the_twins(method, granularity):
    phi3 = tiny_model("phi3", layers=2)
    llama = llama_twin(phi3)
    data = calib(n=4, seq=12, seed=2)
    ids = calib(2, 12, seed=1)[0]
    fused = pruning.prune(phi3, data, method=method, sparsity=0.5, granularity=granularity, progress=False)
    plain = pruning.prune(llama, data, method=method, sparsity=0.5, granularity=granularity, progress=False)
    assert set(fused.masks.groups) == set(plain.masks.groups)
    for key, keep in plain.masks.groups.items():
        assert torch.equal(fused.masks.groups[key], keep), key
    assert not all(bool(k.all()) for k in fused.masks.groups.values())
    masked = _logits(phi3, ids)
    torch.testing.assert_close(masked, _logits(llama, ids), atol=1e-5, rtol=0)
    pruning.compact(phi3, fused.masks)
    torch.testing.assert_close(_logits(phi3, ids), masked, atol=1e-5, rtol=0)
