"""Layer-sequential one-shot Wanda equals a plain whole-model reference written here."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import FAMILY_NAMES, calib, tiny_model
from torch import nn

import pruning
from pruning.structure import family_of

LAYERS = 3


def _collect_sum_sq(model, modules: dict[str, nn.Linear], batches) -> dict[str, torch.Tensor]:
    """Σ_tokens x² of each module's input, from whole-model forwards."""
    sums = {n: torch.zeros(m.in_features) for n, m in modules.items()}

    def hook(name):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x * x).sum(0)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sums


def _decoder_layers(model):
    return model.get_submodule(family_of(model).layers)


def reference_unstructured(model, batches, sparsity=0.5) -> dict[str, torch.Tensor]:
    """Layer by layer: whole-model forward (earlier layers already pruned), |W|·‖X‖, top half per row."""
    model.eval()
    keep_masks = {}
    layers = _decoder_layers(model)
    prefix = family_of(model).layers
    for layer_idx in range(len(layers)):
        layer = layers[layer_idx]
        mods = {f"{prefix}.{layer_idx}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        sums = _collect_sum_sq(model, mods, batches)
        for name, lin in mods.items():
            w = lin.weight.detach()
            score = w.abs() * sums[name].sqrt()[None, :]
            n_keep = w.shape[1] - int(sparsity * w.shape[1])
            idx = score.argsort(dim=1, descending=True)[:, :n_keep]
            keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)
            with torch.no_grad():
                lin.weight.mul_(keep)
            keep_masks[name + ".weight"] = keep
    return keep_masks


def reference_neurons(model, batches, sparsity=0.5, structured="sp") -> dict[str, torch.Tensor]:
    """MLP neurons, top half kept: Wanda-sp score_i = Σ_j |down[j,i]|‖h_i‖ (``structured='sp'``), or
    score_i = Σ_j |gate[i,j]|‖x_j‖ + Σ_j |up[i,j]|‖x_j‖ + Σ_j |down[j,i]|‖h_i‖ (``'sum'``)."""
    model.eval()
    out = {}
    for layer_idx in range(LAYERS):
        mlp = model.model.layers[layer_idx].mlp
        p = f"model.layers.{layer_idx}.mlp."
        mods = {p + "gate_proj": mlp.gate_proj, p + "up_proj": mlp.up_proj, p + "down_proj": mlp.down_proj}
        norms = {n: s.sqrt() for n, s in _collect_sum_sq(model, mods, batches).items()}
        g, u, d = (m.weight.detach() for m in mods.values())
        score = (d.abs() * norms[p + "down_proj"]).sum(0)
        if structured == "sum":
            score = score + (g.abs() * norms[p + "gate_proj"]).sum(1) + (u.abs() * norms[p + "up_proj"]).sum(1)
        n_keep = score.numel() - int(sparsity * score.numel())
        keep = torch.zeros(score.numel(), dtype=torch.bool)
        keep[score.argsort(descending=True)[:n_keep]] = True
        with torch.no_grad():
            mlp.gate_proj.weight.mul_(keep[:, None])
            mlp.up_proj.weight.mul_(keep[:, None])
            mlp.down_proj.weight.mul_(keep[None, :])
        out[f"mlp_neuron.{layer_idx}"] = keep
    return out


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", layers=LAYERS, seed=1)
    batches = calib(n=8, seq=16, seed=3)
    return model, batches


def _check_element(result, ref):
    assert set(result.masks.element) == set(ref)
    for name, keep in ref.items():
        assert torch.equal(result.masks.element[name], keep), name


@pytest.mark.parametrize("offload", [False, True])
def test_sequential_wanda_matches_whole_model_reference(setup, offload):
    model, batches = setup
    ref = reference_unstructured(copy.deepcopy(model), batches)
    assert len(ref) == 7 * LAYERS
    work = copy.deepcopy(model)
    kw = {"device": "cpu", "store": "cpu"} if offload else {}
    res = pruning.prune(work, batches, method="wanda", sparsity=0.5, progress=False, **kw)
    _check_element(res, ref)
    # the masks were applied, every row lost half
    w = work.model.layers[2].mlp.down_proj.weight
    assert ((w == 0).sum(1) == 32).all()


def test_sequential_differs_from_dense_statistics(setup):
    """Control: the reference is sensitive to pruning earlier layers (scores from dense activations differ)."""
    model, batches = setup
    ref = reference_unstructured(copy.deepcopy(model), batches)
    dense = copy.deepcopy(model)
    mods = {n: m for n, m in dense.named_modules() if isinstance(m, nn.Linear) and ".layers.2." in n}
    sums = _collect_sum_sq(dense, mods, batches)
    name = "model.layers.2.mlp.down_proj"
    score = mods[name].weight.abs() * sums[name].sqrt()[None, :]
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.argsort(1, descending=True)[:, :32], True)
    assert not torch.equal(keep, ref[name + ".weight"])


def test_non_sequential_wanda_uses_dense_statistics(setup):
    model, batches = setup
    ref = reference_unstructured(copy.deepcopy(model), batches)
    res = pruning.prune(copy.deepcopy(model), batches, method="wanda", sparsity=0.5, sequential=False, progress=False)
    # layer 0 sees the same inputs either way; later layers differ
    for name in ref:
        if ".layers.0." in name:
            assert torch.equal(res.masks.element[name], ref[name])
    assert any(not torch.equal(res.masks.element[n], ref[n]) for n in ref if ".layers.2." in n)


@pytest.mark.parametrize("structured", [None, "sum"])
@pytest.mark.parametrize("offload", [False, True])
def test_sequential_wanda_neurons_match_reference(setup, offload, structured):
    model, batches = setup
    ref = reference_neurons(copy.deepcopy(model), batches, structured=structured or "sp")
    kw = {"device": "cpu", "store": "cpu"} if offload else {}
    kw["criterion_options"] = {"structured": structured} if structured else {}
    res = pruning.prune(
        copy.deepcopy(model), batches, method="wanda", sparsity=0.5, granularity="mlp_neuron", progress=False, **kw
    )
    assert set(res.masks.groups) == set(ref)
    for key, keep in ref.items():
        assert torch.equal(res.masks.groups[key], keep), key
    assert res.info["kept_groups_per_layer"] == {0: 32, 1: 32, 2: 32}


def test_sequential_2_4_matches_reference(setup):
    model, batches = setup
    ref_model = copy.deepcopy(model).eval()
    ref = {}
    for layer_idx in range(LAYERS):
        mods = {
            f"model.layers.{layer_idx}.{n}": m
            for n, m in ref_model.model.layers[layer_idx].named_modules()
            if isinstance(m, nn.Linear)
        }
        sums = _collect_sum_sq(ref_model, mods, batches)
        for name, lin in mods.items():
            score = lin.weight.detach().abs() * sums[name].sqrt()[None, :]
            blocks = score.reshape(score.shape[0], -1, 4)
            keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, blocks.topk(2, -1).indices, True)
            keep = keep.reshape(score.shape)
            with torch.no_grad():
                lin.weight.mul_(keep)
            ref[name + ".weight"] = keep
    res = pruning.prune(copy.deepcopy(model), batches, method="wanda", sparsity=0.5, granularity="2:4", progress=False)
    _check_element(res, ref)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sequential_wanda_every_family(family):
    model = tiny_model(family, layers=2, seed=2)
    batches = calib(n=4, seq=12, seed=4)
    ref = reference_unstructured(copy.deepcopy(model), batches)
    assert len(ref) == 2 * {"opt": 6, "phi3": 4, "gpt_neox": 4}.get(family, 7)
    res = pruning.prune(copy.deepcopy(model), batches, method="wanda", sparsity=0.5, progress=False)
    _check_element(res, ref)


def reference_true_sequential(model, batches, sparsity=0.5) -> dict[str, torch.Tensor]:
    """Linear by Linear in execution order: a whole-model forward (everything before it already pruned) gives that
    Linear's input norms, |W|·‖X‖, top half per row, then the next Linear."""
    model.eval()
    order: list[str] = []
    mods = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
        for n, m in mods.items()
    ]
    with torch.no_grad():
        model(input_ids=batches[0], use_cache=False)
    for h in handles:
        h.remove()
    keep_masks = {}
    for name in order:
        lin = mods[name]
        norms = _collect_sum_sq(model, {name: lin}, batches)[name].sqrt()
        w = lin.weight.detach()
        score = w.abs() * norms[None, :]
        n_keep = w.shape[1] - int(sparsity * w.shape[1])
        idx = score.argsort(dim=1, descending=True)[:, :n_keep]
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)
        with torch.no_grad():
            lin.weight.mul_(keep)
        keep_masks[name + ".weight"] = keep
    return keep_masks


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_within_layer_sequential_matches_linear_by_linear_reference(family):
    model = tiny_model(family, layers=2, seed=1)
    batches = calib(n=8, seq=16, seed=3)
    ref = reference_true_sequential(copy.deepcopy(model), batches)
    work = copy.deepcopy(model)
    res = pruning.prune(work, batches, method="wanda", sparsity=0.5, within_layer="sequential", progress=False)
    _check_element(res, ref)
    dense = pruning.prune(copy.deepcopy(model), batches, method="wanda", sparsity=0.5, progress=False)
    assert any(not torch.equal(dense.masks.element[k], v) for k, v in ref.items())  # the protocols differ
    ids = batches[0]
    with torch.no_grad():  # the pruned model computes with the masks it reports
        zeroed = copy.deepcopy(model)
        for n, keep in res.masks.element.items():
            zeroed.get_parameter(n).mul_(keep)
        torch.testing.assert_close(work(input_ids=ids).logits, zeroed(input_ids=ids).logits)


def test_within_layer_sequential_refuses_structured(setup):
    model, batches = setup
    with pytest.raises(ValueError, match="within_layer='sequential' prunes each Linear on its own"):
        pruning.prune(
            copy.deepcopy(model),
            batches,
            method="wanda",
            sparsity=0.3,
            granularity="mlp_neuron",
            within_layer="sequential",
            progress=False,
        )


def test_within_layer_sequential_sparsegpt_runs_2_4(setup):
    model, batches = setup
    work = copy.deepcopy(model)
    res = pruning.prune(
        work, batches, method="sparsegpt", sparsity=0.5, granularity="2:4", within_layer="sequential", progress=False
    )
    for name, keep in res.masks.element.items():
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert (work.get_parameter(name)[~keep] == 0).all()
