"""Mixture-of-experts families (transformers' 3-D expert layout): structure discovery, neurons inside experts (one
width per expert: partitions), the shared expert's neurons, masked forward == hand-zeroed copy, zeros held in
training."""

from __future__ import annotations

import copy

import pytest
import torch
from test_families import _assert_pruned_zero, _hand_zeroed, _train
from tiny import MOE_NAMES, calib, tiny_model

import pruning
from pruning.structure import ModelStructure

EXPERTS, WIDTH, HIDDEN = 4, 32, 32


@pytest.mark.parametrize("family", MOE_NAMES)
def test_moe_structure(family):
    s = ModelStructure(tiny_model(family, layers=2))
    experts = s.group_sets("expert")
    # an expert: its router row (32) and its gate/up rows and down columns (3 * 32 * 32)
    assert [g.count for g in experts] == [EXPERTS] * 2
    assert experts[0].params_per_group == HIDDEN + 3 * WIDTH * HIDDEN
    neurons = s.group_sets("expert_neuron")
    assert [(g.count, g.partitions) for g in neurons] == [(EXPERTS * WIDTH, EXPERTS)] * 2
    assert neurons[0].params_per_group == 3 * HIDDEN
    assert s.widths(0)[s.family.experts_attr] == EXPERTS
    if family == "qwen2_moe":  # the shared expert is the dense MLP
        assert [g.count for g in s.group_sets("mlp_neuron")] == [64, 64]
    else:
        with pytest.raises(ValueError, match="expert_neuron"):
            s.group_sets("mlp_neuron")
    if family == "olmoe":  # q_norm/k_norm over the whole projection: no head can go exactly
        with pytest.raises(ValueError, match="all heads at once"):
            s.group_sets("attention_head")


def test_expert_neuron_factor_by_hand():
    """Neuron 1 of expert 2 is rows 1 and 33 of gate_up_proj[2] and column 1 of down_proj[2], nothing else."""
    s = ModelStructure(tiny_model("mixtral", layers=1))
    gs = s.group_sets("expert_neuron")[0]
    keep = torch.ones(gs.count, dtype=torch.bool)
    keep[2 * WIDTH + 1] = False
    masks = pruning.MaskSet()
    masks.set_groups(gs, keep)
    gate_up = masks.keep_mask("model.layers.0.mlp.experts.gate_up_proj", s.param(gs.members[0].name))
    down = masks.keep_mask("model.layers.0.mlp.experts.down_proj", s.param(gs.members[2].name))
    assert (~gate_up).nonzero()[:, :2].unique(dim=0).tolist() == [[2, 1], [2, 33]]
    assert (~down).nonzero()[:, [0, 2]].unique(dim=0).tolist() == [[2, 1]]


@pytest.mark.parametrize("family", MOE_NAMES)
@pytest.mark.parametrize("granularity", ["expert_neuron", "unstructured"])
def test_moe_masked_forward_and_training(family, granularity):
    model = tiny_model(family, layers=2)
    original = copy.deepcopy(model)
    ids = calib(n=4, seq=12)
    res = pruning.prune(model, method="magnitude", sparsity=0.5, granularity=granularity, progress=False)
    if granularity == "expert_neuron":  # every expert keeps the same width
        assert {int(k.reshape(EXPERTS, -1).sum(1).unique().numel()) for k in res.masks.groups.values()} == {1}
    with torch.no_grad():
        got = model(input_ids=ids[0]).logits
        want = _hand_zeroed(original, res.masks)(input_ids=ids[0]).logits
    assert torch.equal(got, want)
    res.masks.attach(model)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        _train(model, opt, ids, 20, res.masks)
        _assert_pruned_zero(model, res.masks)
    finally:
        res.masks.detach()


def test_shared_expert_neurons():
    model = tiny_model("qwen2_moe", layers=2)
    original = copy.deepcopy(model)
    ids = calib(n=2, seq=12)[0]
    res = pruning.prune(
        model, method="wanda", sparsity=0.5, granularity="mlp_neuron", progress=False, calibration=calib()
    )
    assert all("shared_expert" in m.name for gs in res.masks.group_sets.values() for m in gs.members)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        assert torch.equal(masked, _hand_zeroed(original, res.masks)(input_ids=ids).logits)
    before = sum(p.numel() for p in model.parameters())
    pruning.compact(model, res.masks)
    assert model.config.shared_expert_intermediate_size == 32
    assert before - sum(p.numel() for p in model.parameters()) == 2 * 32 * 3 * HIDDEN
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("granularity", ["attention_head", "query_head"])
def test_moe_heads_compact_and_reload(tmp_path, family, granularity):
    """Attention of an MoE model: compacted logits equal the masked ones, the export loads back."""
    model = tiny_model(family, layers=2)
    ids = calib(n=2, seq=12)[0]
    res = pruning.prune(model, calib(), method="wanda", sparsity=0.5, granularity=granularity, progress=False)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    before = sum(p.numel() for p in model.parameters())
    pruning.compact(model, res.masks)
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked, atol=1e-5, rtol=0)
    pruning.save_pretrained(model, tmp_path / "export")
    loaded = pruning.load_pretrained(tmp_path / "export", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, masked, atol=1e-5, rtol=0)
