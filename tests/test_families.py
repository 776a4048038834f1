"""Every supported family: structure discovery, masked forward == hand-zeroed copy, masks that hold in training."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import FAMILY_NAMES, calib, tiny_config, tiny_model

import pruning
from pruning.structure import ModelStructure

HIDDEN, INTER, HEADS, KV, HD = 32, 64, 4, 2, 8

# parameters removed with one group, by hand (hidden 32, head_dim 8, 4 heads, 2 KV heads except OPT: MHA)
# llama-like attention_head: q 2*8*32 + k 8*32 + v 8*32 + o 32*16 = 1536; query_head: q 8*32 + o 32*8 = 512
# layer: q 1024 + k 512 + v 512 + o 1024 + gate/up/down 3*2048 = 9216
# qwen2 adds q/k/v biases: 16 + 8 + 8 per KV group, 8 per query head, 32+16+16 per layer
# OPT (MHA, biases everywhere): neuron 32 + 1 + 32; head (8 + 8*32)*3 + 32*8; layer 4*1056 + 2112 + 2080
PER_GROUP = {
    "llama": {"mlp_neuron": 96, "attention_head": 1536, "query_head": 512, "layer": 9216},
    "mistral": {"mlp_neuron": 96, "attention_head": 1536, "query_head": 512, "layer": 9216},
    "qwen2": {"mlp_neuron": 96, "attention_head": 1568, "query_head": 520, "layer": 9280},
    "qwen3": {"mlp_neuron": 96, "attention_head": 1536, "query_head": 512, "layer": 9216},
    "opt": {"mlp_neuron": 65, "attention_head": 1048, "layer": 8416},
    "gemma": {"mlp_neuron": 96, "attention_head": 1536, "query_head": 512, "layer": 9216},
    "gemma2": {"mlp_neuron": 96, "attention_head": 1536, "query_head": 512, "layer": 9216},
    "gemma3_text": {"mlp_neuron": 96, "attention_head": 1536, "query_head": 512, "layer": 9216},
    # fused qkv_proj / gate_up_proj: the same weights as Llama's, in two Linears fewer
    "phi3": {"mlp_neuron": 96, "attention_head": 1536, "query_head": 512, "layer": 9216},
    # MHA with biases, as OPT: its query_key_value holds 3 * 8 rows (and biases) per head
    "gpt_neox": {"mlp_neuron": 65, "attention_head": 1048, "layer": 8416},
}
MHA = ("opt", "gpt_neox")  # no grouped-query attention: one KV group per head
LINEARS = {"opt": 6, "phi3": 4, "gpt_neox": 4}  # Linears per decoder layer (7 elsewhere)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_structure_counts(family):
    model = tiny_model(family, layers=3)
    s = ModelStructure(model)
    assert model.config.model_type in s.family.model_types
    assert s.num_layers == 3
    neurons = s.group_sets("mlp_neuron")
    assert len(neurons) == 3 and [g.count for g in neurons] == [INTER] * 3
    heads = s.group_sets("attention_head")
    assert [g.count for g in heads] == [HEADS if family in MHA else KV] * 3
    layers = s.group_sets("layer")
    assert len(layers) == 3 and all(g.count == 1 for g in layers)
    kinds = ["mlp_neuron", "attention_head", "layer"]
    if family not in MHA:
        q = s.group_sets("query_head")
        assert [g.count for g in q] == [HEADS] * 3 and all(g.partitions == KV for g in q)
        kinds.append("query_head")
    for kind in kinds:
        assert s.group_sets(kind)[1].params_per_group == PER_GROUP[family][kind], kind
    # the element targets are the Linears of each layer
    assert len(s.targets()) == 3 * LINEARS.get(family, 7)
    # a group set's members really have the shapes the group claims
    for gs in neurons:
        for m in gs.members:
            assert s.param(m.name).shape[m.dim] >= m.offset + gs.count * m.size


def test_llama_neuron_members_by_name():
    s = ModelStructure(tiny_model("llama", layers=1))
    gs = s.group_sets("mlp_neuron")[0]
    assert [(m.name, m.dim) for m in gs.members] == [
        ("model.layers.0.mlp.gate_proj.weight", 0),
        ("model.layers.0.mlp.up_proj.weight", 0),
        ("model.layers.0.mlp.down_proj.weight", 1),
    ]
    assert gs.params_per_group == 3 * HIDDEN


def test_unsupported_model_error():
    gpt2 = tiny_model("gpt2", layers=1, seed=0, attn=None)
    with pytest.raises(
        pruning.UnsupportedModelError,
        match=r"gpt2.*supported: gemma, gemma2, gemma3_text, gpt_neox, llama, mistral, mixtral, olmoe, opt, phi3, "
        r"qwen2, qwen2_moe, qwen3, qwen3_moe"
        r".*register_family",
    ):
        ModelStructure(gpt2)
    with pytest.raises(pruning.UnsupportedModelError, match="register_family"):
        pruning.prune(gpt2, method="magnitude", progress=False)


def _hand_zeroed(original, masks):
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name in masks.names():
            p = ref.get_parameter(name)
            p.mul_(masks.keep_mask(name, p))
    return ref


def _assert_pruned_zero(model, masks):
    for name in masks.names():
        p = model.get_parameter(name)
        keep = masks.keep_mask(name, p)
        assert (p[~keep] == 0).all(), name


def _train(model, opt, batches, steps, masks=None, autocast=False):
    model.train()
    for step in range(steps):
        ids = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if masks is not None:
            _assert_pruned_zero(model, masks)


@pytest.mark.parametrize("granularity", ["mlp_neuron", "attention_head", "unstructured"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_masked_forward_and_training(family, granularity):
    model = tiny_model(family, layers=2)
    original = copy.deepcopy(model)
    ids = calib(n=4, seq=12)
    res = pruning.prune(model, method="magnitude", sparsity=0.5, granularity=granularity, progress=False)
    masks = res.masks
    assert res.report.targeted.fraction == pytest.approx(0.5, abs=0.02)
    if granularity == "attention_head" and family not in MHA:
        assert [int(v.sum()) for v in masks.groups.values()] == [1, 1]
    ref = _hand_zeroed(original, masks)
    with torch.no_grad():
        got = model(input_ids=ids[0]).logits
        want = ref(input_ids=ids[0]).logits
        dense = original(input_ids=ids[0]).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, dense)

    masks.attach(model)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _train(model, opt, ids, 20, masks)
        # training did happen on the kept weights
        name = next(iter(sorted(masks.names())))
        p = model.get_parameter(name)
        keep = masks.keep_mask(name, p)
        assert not torch.equal(p[keep], before[name][keep])
    finally:
        masks.detach()


def test_without_attach_weights_revive():
    """Control: the training test can fail: unattached masks do not hold."""
    model = tiny_model("llama", layers=1)
    res = pruning.prune(model, method="magnitude", sparsity=0.5, progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.raises(AssertionError):
        _train(model, opt, calib(n=2, seq=8), 2, res.masks)


@pytest.mark.parametrize("granularity", ["mlp_neuron", "unstructured"])
def test_momentum_before_mask(granularity):
    model = tiny_model("llama", layers=2)
    batches = calib(n=4, seq=12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, batches, 3)
    assert any(torch.is_tensor(v) and v.abs().sum() > 0 for st in opt.state.values() for v in st.values())
    model.eval()
    res = pruning.prune(model, method="magnitude", sparsity=0.5, granularity=granularity, progress=False)
    res.masks.attach(model)
    try:
        _assert_pruned_zero(model, res.masks)
        _train(model, opt, batches, 5, res.masks)
        # the optimiser state at pruned positions is cleared too
        for name in res.masks.names():
            p = model.get_parameter(name)
            keep = res.masks.keep_mask(name, p)
            for v in opt.state[p].values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    assert (v[~keep] == 0).all()
    finally:
        res.masks.detach()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_bf16_autocast_keeps_zeros(family):
    model = tiny_model(family, layers=2)
    res = pruning.prune(model, method="magnitude", sparsity=0.5, granularity="unstructured", progress=False)
    res.masks.attach(model)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        _train(model, opt, calib(n=4, seq=12), 5, res.masks, autocast=True)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    finally:
        res.masks.detach()


def test_tiny_config_families_distinct():
    assert {tiny_config(f).model_type for f in FAMILY_NAMES} == set(FAMILY_NAMES)
