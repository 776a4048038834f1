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
@pytest.mark.parametrize(
    "method,granularity", [("magnitude", "expert_neuron"), ("taylor", "expert_neuron"), ("magnitude", "unstructured")]
)
def test_moe_masked_forward_and_training(family, method, granularity):
    model = tiny_model(family, layers=2)
    original = copy.deepcopy(model)
    ids = calib(n=4, seq=12)
    res = pruning.prune(model, ids, method=method, sparsity=0.5, granularity=granularity, progress=False)
    if granularity == "expert_neuron":  # every expert keeps the same width
        assert {int(k.reshape(EXPERTS, -1).sum(1).unique().numel()) for k in res.masks.groups.values()} == {1}
    with torch.no_grad():
        got = model(input_ids=ids[0]).logits
        want = _hand_zeroed(original, res.masks)(input_ids=ids[0]).logits
    assert torch.equal(got, want)
    _train_held(model, res.masks, ids)


def _train_held(model, masks, ids, steps: int = 20) -> None:
    """``steps`` AdamW steps on ``ids`` with ``masks`` attached: the pruned weights stay exactly zero throughout."""
    masks.attach(model)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        _train(model, opt, ids, steps, masks)
        _assert_pruned_zero(model, masks)
    finally:
        masks.detach()


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


@pytest.mark.parametrize("family", MOE_NAMES)
def test_expert_neurons_compact_to_a_stock_config(tmp_path, family):
    """One width per expert: compact gives the masked logits with a stock config (fewer neurons per expert) that
    plain from_pretrained loads."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, layers=2)
    ids = calib(n=2, seq=12)[0]
    res = pruning.prune(model, method="magnitude", sparsity=0.5, granularity="expert_neuron", progress=False)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    before = sum(p.numel() for p in model.parameters())
    pruning.compact(model, res.masks)
    s = ModelStructure(model)
    assert not model.config.is_heterogeneous
    assert getattr(model.config, s.family.expert_intermediate_attr) == WIDTH // 2 == s.expert_width(0)
    assert before - sum(p.numel() for p in model.parameters()) == 2 * EXPERTS * WIDTH // 2 * 3 * HIDDEN
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked, atol=1e-5, rtol=0)
    pruning.save_pretrained(model, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, masked, atol=1e-5, rtol=0)


def test_routing_statistics_by_hand():
    """Routed-token counts add up to k per token; REAP's sum for each expert equals Σ g·‖down(silu(gate x)·up x)‖
    over the tokens routed to it, computed from the 3-D weights by hand."""
    from pruning.stats import ActivationCollector

    model = tiny_model("mixtral", layers=1)
    experts = model.model.layers[0].mlp.experts
    seen = []
    handle = experts.register_forward_pre_hook(lambda mod, args: seen.append([a.detach().clone() for a in args]))
    collector = ActivationCollector({"experts": experts}, kinds=("routing",)).attach()
    ids = calib(n=2, seq=12)[0]
    with torch.no_grad():
        model(input_ids=ids)
    collector.detach()
    handle.remove()
    stats = collector.stats["experts"].compute()
    x, index, gate = seen[0]
    assert int(stats["routed"].sum()) == index.numel() == 2 * x.shape[0]
    for e in range(EXPERTS):
        rows, slot = (index == e).nonzero(as_tuple=True)
        g, u = (x[rows] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        f = (torch.nn.functional.silu(g) * u) @ experts.down_proj[e].T
        want = (gate[rows, slot] * f.norm(dim=-1)).sum()
        assert int(stats["routed"][e]) == len(rows)
        torch.testing.assert_close(stats["reap"][e], want.float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- whole experts
def _routed(experts, seen):
    """A pre-hook on an experts module recording the top-k expert indices of every forward."""
    return experts.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()))


def _experts_attr(model):
    return getattr(model.config, ModelStructure(model).family.experts_attr)


def test_expert_scores_by_hand():
    """frequency = tokens whose top-k holds e; reap = mean over those tokens of g_e(x)·‖f_e(x)‖₂, with f_e computed
    from the 3-D weights by hand; both from the scores the criteria give inside pruning.prune's pipeline."""
    from pruning.pipeline.drive import collect_activations
    from pruning.pipeline.pruner import Pruner

    model = tiny_model("mixtral", layers=1)
    experts = model.model.layers[0].mlp.experts
    seen = []
    handle = experts.register_forward_pre_hook(lambda mod, args: seen.append([a.detach().clone() for a in args]))
    scores = {}
    for method in ("frequency", "reap"):
        seen.clear()
        pruner = Pruner(model, pruning.PruneOptions(method=method, granularity="expert", sparsity=0.25))
        ctx = pruner.context(collect_activations(pruner, calib()))
        scores[method] = pruner.criterion.group_scores(pruner.targets.group_sets[0], ctx)
    handle.remove()
    seen = [s for s in seen if s[1].shape[-1] == 2]  # the layer's own calls (not REAP's one expert at a time)
    x, index, gate = (torch.cat([s[i] for s in seen]) for i in range(3))
    for e in range(EXPERTS):
        rows, slot = (index == e).nonzero(as_tuple=True)
        g, u = (x[rows] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        f = (torch.nn.functional.silu(g) * u) @ experts.down_proj[e].T
        assert int(scores["frequency"][e]) == len(rows) > 0
        want = (gate[rows, slot] * f.norm(dim=-1)).mean()
        torch.testing.assert_close(scores["reap"][e], want.float(), rtol=1e-5, atol=1e-6)
    assert int(scores["frequency"].sum()) == 2 * x.shape[0]  # top-2 of every token


@pytest.mark.parametrize("method", ["frequency", "reap", "taylor", "sdm"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_experts_compact_like_masked_and_reload(tmp_path, family, method):
    """A quarter of the experts of every layer go (1 of 4; top-2 among the 3 left): the masked model never routes to
    a removed expert, and the compacted model routes every token to the same kept experts (renumbered) with the same
    logits; stock from_pretrained loads the export with 3 experts per layer and gives those logits again."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, layers=2)
    ids = calib(n=2, seq=12)[0]
    extra = {"alpha": 0.5} if method == "sdm" else {}
    res = pruning.prune(model, calib(), method=method, granularity="expert", sparsity=0.25, progress=False, **extra)
    keeps = [res.masks.groups[f"expert.{i}"] for i in range(2)]
    assert [int(k.sum()) for k in keeps] == [3, 3]
    layers = ModelStructure(model).layers
    seen: list[torch.Tensor] = []
    handles = [_routed(layer.mlp.experts, seen) for layer in layers]
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    masked_routes = list(seen)
    for i, keep in enumerate(keeps):  # never a removed expert
        assert not bool(torch.isin(masked_routes[i], (~keep).nonzero().flatten()).any())
    res.masks.release_routers()  # a zeroed router row alone lets its expert be picked: the hook is what holds
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, masked)
    res.masks.apply(model)
    before = sum(p.numel() for p in model.parameters())
    shared = layers[0].mlp.shared_expert.down_proj.weight.shape if family == "qwen2_moe" else None
    pruning.compact(model, res.masks)
    for h in handles:
        h.remove()
    assert before - sum(p.numel() for p in model.parameters()) == 2 * (HIDDEN + 3 * WIDTH * HIDDEN)
    assert _experts_attr(model) == 3 and model.config.num_experts_per_tok == 2
    assert not model.config.is_heterogeneous
    if shared is not None:  # the shared expert stays whole
        assert layers[0].mlp.shared_expert.down_proj.weight.shape == shared
    seen.clear()
    handles = [_routed(layer.mlp.experts, seen) for layer in ModelStructure(model).layers]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked, atol=1e-5, rtol=0)
    for h in handles:
        h.remove()
    for i, keep in enumerate(keeps):  # the same experts, renumbered among the kept ones
        renumber = torch.cumsum(keep.long(), 0) - 1
        assert torch.equal(seen[i], renumber[masked_routes[i]])
    pruning.save_pretrained(model, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), attn_implementation="eager").eval()
    assert _experts_attr(loaded) == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_removed_experts_stay_zero_and_unrouted_in_training(family):
    model = tiny_model(family, layers=2)
    ids = calib(n=4, seq=12)
    res = pruning.prune(model, ids, method="reap", granularity="expert", sparsity=0.5, progress=False)
    seen: list[torch.Tensor] = []
    layers = ModelStructure(model).layers
    handles = [_routed(layer.mlp.experts, seen) for layer in layers]
    try:
        _train_held(model, res.masks, ids)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 2 * 20
    for i in range(2):
        removed = (~res.masks.groups[f"expert.{i}"]).nonzero().flatten()
        assert len(removed) == 2
        assert not any(bool(torch.isin(idx, removed).any()) for idx in seen[i::2])


def test_expert_bad_input():
    calibration = calib()
    with pytest.raises(ValueError, match=r"granularity='expert' prunes routed experts; layer 0 of this llama"):
        pruning.prune(tiny_model("llama"), method="magnitude", granularity="expert", sparsity=0.25, progress=False)
    with pytest.raises(ValueError, match=r"leaves 1 of the 4 experts.*num_experts_per_tok.*at most 0.5"):
        pruning.prune(tiny_model("mixtral"), calibration, method="reap", granularity="expert", sparsity=0.75)
    with pytest.raises(ValueError, match=r"allocation='owl'.*HINT: for granularity='expert' use allocation='uniform'"):
        pruning.PruneOptions(method="reap", granularity="expert", allocation="owl")
    with pytest.raises(ValueError, match=r"layer_rates=\[0.0, 0.75\] leaves 1 of the 4 experts of layer 1"):
        pruning.prune(
            tiny_model("qwen3_moe"), calibration, method="reap", granularity="expert", allocation="rates",
            layer_rates=[0.0, 0.75],
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"leaves 3 of the 8 experts of the model, fewer than the 2 per layer"):
        pruning.prune(tiny_model("mixtral"), calibration, method="reap", granularity="expert", sparsity=0.7,
                      allocation="global")  # fmt: skip
    with pytest.raises(ValueError, match=r"method='wanda' does not support granularity='expert'"):
        pruning.PruneOptions(method="wanda", granularity="expert")
    with pytest.raises(ValueError, match=r"method='reap' does not support granularity='expert_neuron'.*\['expert'\]"):
        pruning.prune(tiny_model("mixtral"), calibration, method="reap", granularity="expert_neuron")


def test_lifted_teacher_routes_to_every_expert():
    """With the masks lifted (the distillation teacher) the model is the original one again: its removed experts'
    weights are back and its router chooses among all experts."""
    model = tiny_model("qwen3_moe", layers=2)
    original = copy.deepcopy(model)
    ids = calib(n=2, seq=12)[0]
    res = pruning.prune(model, calib(), method="reap", granularity="expert", sparsity=0.5, keep_original=True)
    with torch.no_grad():
        want = original(input_ids=ids).logits
        assert not torch.allclose(model(input_ids=ids).logits, want)
        with res.masks.lifted(model):
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-6, rtol=0)
        pruned = model(input_ids=ids).logits
    res.masks.release_routers()
    with torch.no_grad():  # the hook is back in force after the lifted block
        assert not torch.equal(model(input_ids=ids).logits, pruned)


def test_sdm_and_taylor_expert_scores_by_hand():
    """sdm over experts = Σₙ |Σ_{expert's weights} gₙ·w| (one backward per sequence, CE at α = 0); taylor's element
    form = Σ_{expert's weights} |G·w| with G = Σₙ gₙ."""
    from pruning.pipeline.calibration import collect_gradients, sequence_losses
    from pruning.pipeline.pruner import Pruner

    model = tiny_model("mixtral", layers=1)
    batches = calib(n=4, seq=12)
    names = ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj"]
    names.append("model.layers.0.mlp.experts.down_proj")
    params = [model.get_parameter(n) for n in names]
    sdm_want, grad_sum = torch.zeros(EXPERTS), [torch.zeros_like(p) for p in params]
    for row in torch.cat(batches):
        ids = row[None]
        loss = sequence_losses(model(input_ids=ids).logits, ids, None, 0.0, 1.0)
        grads = torch.autograd.grad(loss, params)
        sdm_want += sum((g * p).detach().reshape(EXPERTS, -1).sum(1) for g, p in zip(grads, params)).abs()
        grad_sum = [a + g for a, g in zip(grad_sum, grads)]
    taylor_want = sum((g * p).detach().abs().reshape(EXPERTS, -1).sum(1) for g, p in zip(grad_sum, params))
    for method, want in (("sdm", sdm_want), ("taylor", taylor_want)):
        pruner = Pruner(model, pruning.PruneOptions(method=method, granularity="expert", sparsity=0.25))
        gradients = collect_gradients(model, batches, pruner.gradient_collector(), progress=False)
        got = pruner.criterion.group_scores(pruner.targets.group_sets[0], pruner.context(None, gradients))
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", MOE_NAMES)
def test_per_layer_expert_counts_export(tmp_path, family):
    """Per-layer rates: layers keep 3, 2 and 4 experts (and, pruned again, half of each expert's neurons); the
    compacted model has a per-layer config with those counts, gives the masked logits, and its export loads back
    through pruning.load_pretrained with the same logits."""
    model = tiny_model(family, layers=3)
    ids = calib(n=2, seq=12)[0]
    res = pruning.prune(
        model, calib(), method="frequency", granularity="expert", allocation="rates", layer_rates=[0.25, 0.5, 0.0],
        progress=False,
    )  # fmt: skip
    assert [int(res.masks.groups[f"expert.{i}"].sum()) for i in range(3)] == [3, 2, 4]
    pruning.prune(model, method="magnitude", granularity="expert_neuron", sparsity=0.5, masks=res.masks)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    pruning.compact(model, res.masks)
    s = ModelStructure(model)
    assert [(s.num_experts(i), s.expert_width(i)) for i in range(3)] == [(3, 16), (2, 16), (4, 16)]
    assert model.config.is_heterogeneous
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked, atol=1e-5, rtol=0)
    pruning.save_pretrained(model, tmp_path / "export")
    loaded = pruning.load_pretrained(tmp_path / "export", attn_implementation="eager")
    s = ModelStructure(loaded)
    assert [s.num_experts(i) for i in range(3)] == [3, 2, 4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, masked, atol=1e-5, rtol=0)


def test_global_expert_ranking_keeps_top_k_per_layer():
    """allocation='global': one ranking of REAP scores over the layers; every layer keeps at least top-k (2)."""
    model = tiny_model("mixtral", layers=3)
    res = pruning.prune(model, calib(), method="reap", granularity="expert", sparsity=0.5, allocation="global")
    kept = [int(res.masks.groups[f"expert.{i}"].sum()) for i in range(3)]
    assert sum(kept) == 6 and min(kept) >= 2


@pytest.mark.parametrize("method", ["reap", "taylor"])
def test_expert_event_from_training_steps(method):
    """The training-time path (what the callbacks call): statistics collected over training steps, then an event;
    REAP's routing sums equal those of a calibration pass over the same batches in eval mode (no jitter, no
    dropout), and the masks then hold through more training with the removed experts never routed to."""
    from pruning.pipeline.event import event_collectors, prune_event

    model = tiny_model("mixtral", layers=2)
    reference = copy.deepcopy(model)
    ids = list(torch.cat(calib(n=4, seq=12)).split(1))  # one sequence a step: expert weights are not Linears
    options = pruning.PruneOptions(method=method, granularity="expert", sparsity=0.25)
    activations, gradients = event_collectors(model, options)
    for c in (activations, gradients):
        if c is not None:
            c.attach()
    model.train()
    for batch in ids:
        if gradients is not None:
            gradients.begin_batch(batch.shape[0])
        model(input_ids=batch, labels=batch).loss.backward()
        if gradients is not None:
            gradients.end_batch()
        model.zero_grad()
    for c in (activations, gradients):
        if c is not None:
            c.detach()
            c.reduce()
    res = prune_event(model, options, pruning.MaskSet(), activations, gradients)
    want = pruning.prune(reference, ids, method=method, granularity="expert", sparsity=0.25, progress=False)
    for i in range(2):
        assert torch.equal(res.masks.groups[f"expert.{i}"], want.masks.groups[f"expert.{i}"])
    seen: list[torch.Tensor] = []
    handles = [_routed(layer.mlp.experts, seen) for layer in ModelStructure(model).layers]
    res.masks.attach(model)
    try:
        _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), ids, 4, res.masks)
    finally:
        res.masks.detach()
        for h in handles:
            h.remove()
    for i in range(2):
        removed = (~res.masks.groups[f"expert.{i}"]).nonzero().flatten()
        assert not any(bool(torch.isin(idx, removed).any()) for idx in seen[i::2])


def test_expert_exports_load_in_a_process_without_pruning(tmp_path):
    """Experts removed (a quarter of them, REAP) in each MoE family: the export is a stock config that plain
    from_pretrained loads in a process that never imports this project, giving the masked model's logits."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file
    from test_surgery import STOCK_CODE

    ids = calib(2, 12, seed=1)[0]
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    want = {}
    for family in MOE_NAMES:
        model = tiny_model(family, layers=2)
        res = pruning.prune(model, calib(), method="reap", granularity="expert", sparsity=0.25, progress=False)
        with torch.no_grad():
            want[family] = model(input_ids=ids, use_cache=False).logits
        pruning.compact(model, res.masks)
        pruning.save_pretrained(model, tmp_path / family)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_CODE, *want], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(str(tmp_path / "logits.safetensors"))
    for family, logits in want.items():
        torch.testing.assert_close(got[family], logits, atol=1e-5, rtol=0, msg=family)


def test_routing_holds_without_the_mask_set_and_in_copies():
    """The router's state is its own: dropping the mask set (garbage-collected) keeps the routing among the kept
    experts (it fell back to every expert, the zeroed rows' logit 0 picked again), and a deep copy of the masked model
    compacts on its own with the same logits (the copy's hook kept the original's expert count and crashed)."""
    import gc

    model = tiny_model("mixtral", layers=2)
    ids = calib(n=2, seq=12)[0]
    res = pruning.prune(model, calib(), method="reap", granularity="expert", sparsity=0.5, progress=False)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    twin = copy.deepcopy(model)
    twin_masks = copy.deepcopy(res.masks)
    del res
    gc.collect()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, masked)
    pruning.compact(twin, twin_masks)
    assert _experts_attr(twin) == 2
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, masked, atol=1e-5, rtol=0)
        assert torch.equal(model(input_ids=ids).logits, masked)  # the original keeps its own routing


def test_an_export_of_masked_experts_is_refused(tmp_path):
    """Saved as it is, the export would route to the removed experts again on reload: compact first."""
    model = tiny_model("mixtral", layers=2)
    res = pruning.prune(model, calib(), method="frequency", granularity="expert", sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match=r"mlp.gate routes around removed experts.*HINT: pruning.compact"):
        pruning.save_pretrained(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    pruning.compact(model, res.masks)
    pruning.save_pretrained(model, tmp_path / "export")
