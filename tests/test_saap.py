"""SAAP: the fused criterion by hand, σ learned on a planted problem, the fluctuation ranking and its repair, and
group fine-tuning in a Lightning run (only the active group of layers changes)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from tiny import calib, tiny_config_dict, tiny_model
from torch.utils.data import DataLoader

import pruning
from pruning.allocation import ranking
from pruning.allocation.ranking import SAAPEstimate, saap_scores
from pruning.callbacks.group_finetune import GroupFinetuneCallback
from pruning.importance import ScoreContext, get_criterion
from pruning.importance.saap import element_term, fuse, learn_uncertainty_weights, normalise
from pruning.stats import GradientStats, GroupGradientStats
from pruning.structure import GroupSet, Member

T = torch.tensor


def quiet_trainer(max_steps: int, callbacks: list, **kw) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=max_steps,
        callbacks=callbacks,
        **kw,
    )


# ------------------------------------------------------------------------------------------------- the criterion
def _stats_case():
    """Two groups: row g of a.weight [2, 2] and column g of b.weight [2, 2]."""
    gs = GroupSet("mlp_neuron", 0, 2, (Member("a.weight", 0, 1), Member("b.weight", 1, 1)), numels=(4, 4))
    weights = {"a.weight": torch.ones(2, 2), "b.weight": torch.ones(2, 2)}
    vec = GroupGradientStats(gs, ("vector",))
    vec.sums["vector"] = T([1.0, 3.0])  # mean 2 -> normalised [0.5, 1.5]
    grads = {}
    for name, v in (("a.weight", [[1.0, 1.0], [2.0, 2.0]]), ("b.weight", [[1.0, 0.0], [1.0, 2.0]])):
        s = GradientStats(("sum_abs_gw",))
        s.sums["sum_abs_gw"] = T(v)
        grads[name] = s
    # element: group 0 = (1+1) + (1+1) = 4, group 1 = (2+2) + (0+2) = 6 -> mean 5 -> [0.8, 1.2]
    return gs, ScoreContext(weights=weights, grad=grads, group={gs.key: vec})


def test_saap_fusion_hand_computed():
    gs, ctx = _stats_case()
    crit = get_criterion("saap", sigma=[1.0, 2.0])
    assert crit.grad_kinds == ("sum_abs_gw",) and crit.group_kinds == ("vector",)
    # I = vec/(2·1) + elem/(2·4) + log 2
    expected = T([0.5, 1.5]) / 2 + T([0.8, 1.2]) / 8 + math.log(2.0)
    torch.testing.assert_close(crit.group_scores(gs, ctx), expected)
    # per-layer σ overrides the global one; default σ = (1, 1): equal weights ½
    crit = get_criterion("saap", sigma=[1.0, 2.0], sigmas={"mlp_neuron.0": [3.0, 1.0]})
    torch.testing.assert_close(crit.group_scores(gs, ctx), T([0.5, 1.5]) / 18 + T([0.8, 1.2]) / 2 + math.log(3.0))
    torch.testing.assert_close(get_criterion("saap").group_scores(gs, ctx), (T([0.5, 1.5]) + T([0.8, 1.2])) / 2)
    mm = get_criterion("saap", normalise="minmax").group_scores(gs, ctx)
    torch.testing.assert_close(mm, T([0.0, 1.0]))


def test_saap_bad_options_and_granularity():
    with pytest.raises(ValueError, match="two positive numbers"):
        get_criterion("saap", sigma=[1.0, 0.0])
    with pytest.raises(ValueError, match="'mean' or 'minmax'"):
        get_criterion("saap", normalise="zscore")
    with pytest.raises(ValueError, match="does not support granularity='unstructured'"):
        get_criterion("saap").check_granularity("unstructured")


# ------------------------------------------------------------------------------------------------- learning σ
def _planted(batches: int, groups: int = 256, seed: int = 0) -> tuple[torch.Tensor, list[tuple]]:
    """The vector term measures the true importance with 5 % noise; the element term is pure noise."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(groups, generator=g).exp()
    terms = []
    for _ in range(batches):
        vec = truth * (1 + 0.05 * torch.randn(groups, generator=g))
        elem = torch.rand(groups, generator=g)
        terms.append((vec, elem))
    return truth, terms


def test_sigma_learning_downweights_the_noise_term():
    truth, terms = _planted(16)
    history: list[tuple[float, float]] = []
    s1, s2 = learn_uncertainty_weights(terms, history=history)
    assert history[0] == (1.0, 1.0)
    w = [(1 / (2 * a * a), 1 / (2 * b * b)) for a, b in history]
    assert w[-1][1] < w[0][1] / 2  # the noise term's weight went down from ½ ...
    assert w[-1][0] > w[0][0] * 10  # ... and the informative term's went up
    assert w[-1][0] > 100 * w[-1][1]
    # converged: the last iterations no longer move σ, and the fixed point does not depend on more iterations
    assert abs(history[-1][0] - history[-2][0]) < 1e-6 and abs(history[-1][1] - history[-2][1]) < 1e-6
    assert learn_uncertainty_weights(terms, iterations=1000) == pytest.approx((s1, s2), rel=1e-5)
    # and σ is stable in the data: other batches of the same problem give nearly the same values
    s1b, s2b = learn_uncertainty_weights(_planted(16, seed=1)[1])
    assert s1b == pytest.approx(s1, rel=0.2) and s2b == pytest.approx(s2, rel=0.2)
    # the fused score recovers the truth better than equal weights do
    vec = normalise(torch.stack([v for v, _ in terms]).sum(0))
    elem = normalise(torch.stack([e for _, e in terms]).sum(0))

    def rank_corr(a, b):
        ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    assert rank_corr(fuse(vec, elem, (s1, s2)), truth) > 0.99
    assert rank_corr(fuse(vec, elem, (s1, s2)), truth) > rank_corr(fuse(vec, elem, (1.0, 1.0)), truth) + 0.02


def test_sigma_learning_needs_two_batches():
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        learn_uncertainty_weights([(torch.ones(3), torch.ones(3))])


def test_saap_scores_on_a_model_match_prune():
    """σ from per-batch statistics; the fused scores of the whole set are the criterion's in pruning.prune."""
    model = tiny_model("llama", 2)
    data = calib(6, seq=12, batch=2)
    est = saap_scores(model, data, "mlp_neuron", progress=False)
    s1, s2 = est.sigmas["mlp_neuron.0"]
    assert s1 > 0 and s2 > 0 and est.sigma_history[0] == (1.0, 1.0)
    assert len(est.batch_scores["mlp_neuron.1"]) == 3
    opts = est.criterion_options()
    assert opts["sigma"] == [s1, s2]
    result = pruning.prune(model, data, "saap", 0.25, "mlp_neuron", criterion_options=opts, progress=False)
    for i, key in enumerate(est.keys):
        keep = result.masks.groups[key]
        assert int(keep.sum()) == 48
        expected = torch.zeros(64, dtype=torch.bool)
        expected[torch.topk(est.scores[key], 48).indices] = True
        assert torch.equal(keep.cpu(), expected), f"layer {i}"
    # attention groups (KV groups) are scored too
    res = pruning.prune(tiny_model("llama", 2), data, "saap", 0.5, "attention_head", progress=False)
    assert res.info["kept_groups_per_layer"] == {0: 1, 1: 1}


def test_saap_second_order_element_term_hand_computed():
    """I_elem + ½ Σ w²·Σ_n g_n² per group (LLM-Pruner's diagonal second-order part from the same gradients)."""
    gs, ctx = _stats_case()
    ctx.weights = {"a.weight": T([[1.0, 2.0], [1.0, 1.0]]), "b.weight": torch.ones(2, 2)}
    for name, v in (("a.weight", [[2.0, 1.0], [0.0, 4.0]]), ("b.weight", [[1.0, 1.0], [2.0, 0.0]])):
        ctx.grad[name].sums["sum_sq"] = T(v)
    # group 0: a row 0 (½·(1·2 + 4·1) = 3) + b column 0 (½·(1·1 + 1·2) = 1.5); group 1: ½·(0 + 4) + ½·(1 + 0) = 2.5
    torch.testing.assert_close(element_term(gs, ctx, second_order=True), T([4.0 + 4.5, 6.0 + 2.5]))
    crit = get_criterion("saap", second_order=True)
    assert crit.grad_kinds == ("sum_abs_gw", "sum_sq") and get_criterion("saap").grad_kinds == ("sum_abs_gw",)
    # end to end: the estimate carries the option, and pruning.prune with it keeps the estimate's top groups
    model = tiny_model("llama", 2)
    data = calib(6, seq=12, batch=2)
    est = saap_scores(model, data, "mlp_neuron", second_order=True, progress=False)
    assert est.criterion_options()["second_order"] is True
    result = pruning.prune(
        model, data, "saap", 0.25, "mlp_neuron", criterion_options=est.criterion_options(), progress=False
    )
    for key in est.keys:
        expected = torch.zeros(64, dtype=torch.bool)
        expected[torch.topk(est.scores[key], 48).indices] = True
        assert torch.equal(result.masks.groups[key].cpu(), expected), key
    first = saap_scores(model, data, "mlp_neuron", progress=False)
    assert not torch.equal(first.scores["mlp_neuron.0"], est.scores["mlp_neuron.0"])


# ------------------------------------------------------------------------------------------ heads and neurons at once
JOINT = "mlp_neuron+attention_head"
NEURON, KV_GROUP = 3 * 32, (16 + 8 + 8 + 16) * 32  # parameters of one MLP neuron and one KV group of the tiny Llama


def _joint_model():
    """Layer 0's KV group 1 barely contributes (its v rows scaled down): cheap per parameter, it should go."""
    model = tiny_model("llama", 2, seed=3)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[8:].mul_(1e-3)
    return model


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_saap_joint_prunes_heads_and_neurons_under_one_budget(allocation):
    model = _joint_model()
    data = calib(6, seq=12, batch=2)
    est = saap_scores(model, data, JOINT, progress=False)
    assert set(est.keys) == {"mlp_neuron.0", "attention_head.0", "mlp_neuron.1", "attention_head.1"}
    res = pruning.prune(
        model,
        data,
        "saap",
        0.25,
        JOINT,
        allocation=allocation,
        criterion_options=est.criterion_options(),
        progress=False,
    )
    removed = {k: int((~m).sum()) for k, m in res.masks.groups.items()}
    per_layer = 64 * NEURON + 2 * KV_GROUP
    budgets = res.info["joint_budgets"]
    if allocation == "uniform":  # each layer: 25 % of its MLP and attention parameters
        for layer in range(2):
            gone = removed[f"mlp_neuron.{layer}"] * NEURON + removed[f"attention_head.{layer}"] * KV_GROUP
            assert budgets[layer] == {"budget": per_layer // 4, "removed": gone}
            assert per_layer // 4 - NEURON < gone <= per_layer // 4  # the target, to within one neuron
    else:  # one budget over the model
        gone = sum(removed[f"mlp_neuron.{i}"] * NEURON + removed[f"attention_head.{i}"] * KV_GROUP for i in range(2))
        assert budgets["model"] == {"budget": 2 * per_layer // 4, "removed": gone}
        assert 2 * per_layer // 4 - NEURON < gone <= 2 * per_layer // 4
    assert not res.masks.groups["attention_head.0"][1]  # the planted cheap KV group went...
    assert removed["mlp_neuron.0"] > 0  # ... with neurons making up the rest of the budget
    assert res.report.targeted.pruned == sum(budgets[k]["removed"] for k in budgets)
    # within a kind the groups go in order of fused importance per parameter
    crit = get_criterion("saap", **est.criterion_options())
    for key, dens in est.scores.items():
        keep = res.masks.groups[key].cpu()
        if (~keep).any() and keep.any():
            assert dens[~keep].max() <= dens[keep].min(), key
    assert crit.granularities[-1] == JOINT
    # the pruned model compacts into smaller layers with the same logits
    ids = data[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        pruning.compact(model, res.masks)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert model.model.layers[0].self_attn.k_proj.out_features == 8  # one KV group left in layer 0


def test_joint_granularity_is_refused_where_unsupported():
    with pytest.raises(ValueError, match="does not support granularity='mlp_neuron\\+attention_head'"):
        pruning.PruneOptions(method="sdm", granularity=JOINT)
    est = saap_scores(_joint_model(), calib(4, seq=12, batch=2), JOINT, progress=False)
    with pytest.raises(ValueError, match="one rate per layer for one kind"):
        ranking.saap_layer_rates(est, 0.25)


def test_saap_learn_sigma_needs_a_window():
    with pytest.raises(ValueError, match="cannot also be given"):
        get_criterion("saap", learn_sigma=True, sigma=[1.0, 1.0])
    with pytest.raises(ValueError, match="HINT: in pruning.prune learn σ first with"):
        pruning.prune(
            tiny_model("llama", 2),
            calib(4, seq=12),
            "saap",
            0.25,
            "mlp_neuron",
            criterion_options={"learn_sigma": True},
            progress=False,
        )


# ------------------------------------------------------------------------------------------------- the ranking
def test_project_rates_mean_bounds_and_whole_groups():
    counts = [64] * 8
    rates = ranking.project_rates([0.9, 0.8, 0.0, 0.1, 0.3, 0.5, 0.2, 0.95], 0.25, counts, max_rate=0.5)
    assert sum(rates) / 8 == 0.25
    assert all(0 <= r <= 0.5 and (r * 64).is_integer() for r in rates)
    # the order of the layers' rates is kept (clip-and-shift)
    assert rates[2] <= rates[3] <= rates[6] <= rates[4] <= rates[5]
    # query heads: steps of one head per KV group, mean exact when reachable
    q = ranking.project_rates([0.1, 0.6, 0.3, 0.2], 0.25, [32] * 4, partitions=4, max_rate=0.9)
    assert sum(q) / 4 == 0.25 and all((r * 8).is_integer() for r in q)
    with pytest.raises(ValueError, match="cannot be met with max_rate=0.2"):
        ranking.project_rates([0.3] * 4, 0.3, [64] * 4, max_rate=0.2)


def test_ranked_rates_nonuniform_with_target_mean():
    indicator = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]
    rates = ranking.ranked_rates(indicator, 0.25, [64] * 8, spread=0.15)
    assert sum(rates) / 8 == 0.25 and len(set(rates)) > 4
    order = sorted(range(8), key=lambda i: indicator[i])
    assert [rates[i] for i in order] == sorted(rates, reverse=True)  # more stable -> pruned more
    # a spread beyond the target leaves the most fluctuating layers unpruned; skipped layers are never pruned
    rates = ranking.ranked_rates(indicator, 0.25, [64] * 8, spread=0.4, skip_layers=[0])
    assert rates[0] == 0.0 and rates[2] == 0.0 and sum(rates) / 8 == 0.25
    # a target that is not a whole number of groups: the nearest reachable mean (102 of 512 groups)
    rates = ranking.ranked_rates(indicator, 0.2, [64] * 8)
    assert sum(rates) * 64 == 102


def test_saap_layer_rates_from_fluctuation():
    """Planted: layer 0's importances jump from batch to batch, layer 2's are stable -> layer 2 loses most."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=g) + 0.5
    noise = [0.6, 0.3, 0.01, 0.1]
    batch_scores = {
        f"mlp_neuron.{i}": [base * (1 + n * torch.randn(64, generator=g)).abs() for _ in range(5)]
        for i, n in enumerate(noise)
    }
    keys = list(batch_scores)
    est = SAAPEstimate(
        granularity="mlp_neuron",
        keys=keys,
        per_batch={},
        sigmas={k: (1.0, 1.0) for k in keys},
        scores={k: torch.stack(v).sum(0) for k, v in batch_scores.items()},
        batch_scores=batch_scores,
        counts=[64] * 4,
    )
    rates, ind = ranking.saap_layer_rates(est, 0.25, spread=0.2)
    assert ind[2] < ind[3] < ind[1] < ind[0]
    assert rates[2] > rates[3] > rates[1] > rates[0]
    assert sum(rates) / 4 == 0.25
    # the rates drive pruning.prune directly
    model = tiny_model("llama", 4)
    res = pruning.prune(
        model, None, "magnitude", 0.25, "mlp_neuron", allocation="rates", layer_rates=rates, progress=False
    )
    assert [64 - res.info["kept_groups_per_layer"][i] for i in range(4)] == [round(r * 64) for r in rates]


def test_saap_end_to_end_rates_on_a_model():
    model = tiny_model("llama", 4)
    est = saap_scores(model, calib(8, seq=12, batch=2), "mlp_neuron", progress=False)
    rates, ind = ranking.saap_layer_rates(est, 0.25)
    assert len(set(rates)) > 1 and sum(rates) / 4 == 0.25
    rates, ind = ranking.saap_layer_rates(est, 0.25, fluctuation="groups", spread=0.2)
    assert len(set(rates)) > 1 and sum(rates) / 4 == 0.25
    with pytest.raises(ValueError, match="'batches' or 'groups'"):
        ranking.saap_layer_rates(est, 0.25, fluctuation="layers")


@pytest.mark.parametrize("source", ["inline", "rates_file"])
def test_saap_through_the_callbacks_equals_core(source, tmp_path):
    """ImportanceCallback + PruningCallback(criterion='saap', allocation='rates') give the core's masks, with σ and
    the rates inline or read from the JSON `pruning rank` writes."""
    import copy
    import json

    from pruning.callbacks import ImportanceCallback, PruningCallback
    from pruning.lightning.module import DistillationModule
    from pruning.schedule import Schedule

    cfg = dict(CFG, num_hidden_layers=2)
    module = DistillationModule(config=cfg, attn_implementation="eager")
    ref = copy.deepcopy(module.student).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 128, (16,), generator=g) for _ in range(4)]
    opts = {"sigma": [0.5, 2.0]}
    if source == "inline":
        pc = PruningCallback(
            "saap",
            "mlp_neuron",
            Schedule(step=4, sparsity=0.25),
            allocation="rates",
            layer_rates=[0.125, 0.375],
            criterion_options=opts,
        )
    else:
        path = tmp_path / "saap.json"
        path.write_text(
            json.dumps(
                {
                    "method": "saap",
                    "target": 0.25,
                    "granularity": "mlp_neuron",
                    "criterion_options": opts,
                    "layer_rates": [0.125, 0.375],
                }
            )
        )
        pc = PruningCallback(
            "saap", "mlp_neuron", Schedule(step=4, sparsity=0.25), allocation="rates", rates_file=str(path)
        )
    trainer = quiet_trainer(5, [ImportanceCallback(freeze_weights=True), pc])
    trainer.fit(module, DataLoader([{"input_ids": s} for s in seqs] * 2, batch_size=1))
    res = pruning.prune(
        ref,
        [s[None] for s in seqs],
        "saap",
        0.25,
        "mlp_neuron",
        allocation="rates",
        layer_rates=[0.125, 0.375],
        criterion_options=opts,
        progress=False,
    )
    assert [int(pc.masks.groups[f"mlp_neuron.{i}"].sum()) for i in range(2)] == [56, 40]
    for k in res.masks.groups:
        assert torch.equal(pc.masks.groups[k], res.masks.groups[k]), k


@pytest.mark.parametrize("granularity", ["mlp_neuron", JOINT])
def test_sigma_learned_in_the_callback_equals_the_pre_pass(granularity):
    """learn_sigma: the callbacks learn σ from the scoring window, one batch per optimiser step (2 sequences under
    accumulate_grad_batches=2); the pre-pass saap_scores on the same 4 batches learns the same σ, and the event's
    masks are pruning.prune's with that σ."""
    import copy

    from pruning.callbacks import ImportanceCallback, PruningCallback
    from pruning.lightning.module import DistillationModule
    from pruning.schedule import Schedule

    cfg = dict(CFG, num_hidden_layers=2)
    module = DistillationModule(config=cfg, attn_implementation="eager")
    ref = copy.deepcopy(module.student).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 128, (16,), generator=g) for _ in range(8)]
    pc = PruningCallback("saap", granularity, Schedule(step=4, sparsity=0.25), criterion_options={"learn_sigma": True})
    trainer = quiet_trainer(5, [ImportanceCallback(freeze_weights=True), pc], accumulate_grad_batches=2)
    trainer.fit(module, DataLoader([{"input_ids": s} for s in seqs] * 2, batch_size=1))
    learned = pc.history[0]["learned"]
    steps = [torch.stack(seqs[i : i + 2]) for i in range(0, 8, 2)]
    est = saap_scores(ref, steps, granularity, progress=False)
    expected = est.criterion_options()
    assert learned["sigma"] == pytest.approx(expected["sigma"], rel=1e-5)
    assert learned["learn_sigma"] is False and learned["sigma"] != [1.0, 1.0]
    res = pruning.prune(ref, steps, "saap", 0.25, granularity, criterion_options=learned, progress=False)
    for k in res.masks.groups:
        assert torch.equal(pc.masks.groups[k], res.masks.groups[k]), k


def _sigma_run(stop: int | None = None, ckpt: str | None = None) -> tuple[list[dict], pl.Trainer]:
    """A 5-step run of SAAP with learn_sigma, interrupted after optimiser step ``stop`` if given."""
    from test_lightning import Resumable, StopAt

    from pruning.callbacks import ImportanceCallback, PruningCallback
    from pruning.lightning.module import DistillationModule
    from pruning.schedule import Schedule

    pl.seed_everything(0, verbose=False)
    module = DistillationModule(config=dict(CFG, num_hidden_layers=2), attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (16,), generator=g)} for _ in range(6)]
    pc = PruningCallback("saap", "mlp_neuron", Schedule(step=4, sparsity=0.25), criterion_options={"learn_sigma": True})
    trainer = quiet_trainer(5, [ImportanceCallback(), pc] + ([StopAt(stop)] if stop is not None else []))
    trainer.fit(module, Resumable(data, batch_size=1, shuffle=False), ckpt_path=ckpt)
    return pc.history, trainer


def test_learned_sigma_survives_a_resume_mid_window(tmp_path):
    full, _ = _sigma_run()
    _, trainer = _sigma_run(stop=2)  # two of the window's four batches closed
    path = str(tmp_path / "step2.ckpt")
    trainer.save_checkpoint(path)
    resumed, _ = _sigma_run(ckpt=path)
    assert resumed[0]["learned"]["sigma"] == pytest.approx(full[0]["learned"]["sigma"], rel=1e-6)


def test_rates_file_errors_name_the_key(tmp_path):
    import json

    from pruning import allocation as alloc
    from pruning.callbacks import PruningCallback
    from pruning.schedule import Schedule

    sched = Schedule(step=4, sparsity=0.25)
    with pytest.raises(ValueError, match="layer_rates or rates_file, not both"):
        PruningCallback("wanda", "mlp_neuron", sched, allocation="rates", layer_rates=[0.25], rates_file="r.json")
    with pytest.raises(ValueError, match="HINT: set allocation: rates"):
        PruningCallback("wanda", "mlp_neuron", sched, rates_file="r.json")
    with pytest.raises(ValueError, match=r"rates_file='.*missing.json': no such file. HINT: write it first"):
        alloc.load_rates_file(tmp_path / "missing.json")
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {"method": "self-pruner", "criterion": "wanda", "granularity": "mlp_neuron", "layer_rates": [0.2, 0.4]}
        )
    )
    with pytest.raises(ValueError, match="has 2 layer rates, the model has 4 layers"):
        alloc.load_rates_file(path, "wanda", "mlp_neuron", 4)
    with pytest.raises(ValueError, match="granularity='mlp_neuron', not 'attention_head'"):
        alloc.load_rates_file(path, "wanda", "attention_head", 2)
    # a search's rates serve any criterion; options only come with the method that learned them
    assert alloc.load_rates_file(path, "taylor", "mlp_neuron", 2) == ([0.2, 0.4], {})
    path.write_text(json.dumps({"layer_rates": [0.2, 1.5]}))
    with pytest.raises(ValueError, match=r"numbers in \[0, 1\)"):
        alloc.load_rates_file(path)


# ------------------------------------------------------------------------------------------------- group fine-tuning
CFG = tiny_config_dict(layers=4, max_position_embeddings=64)


class Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def _take(self, pl_module) -> None:
        self.states.append({n: p.detach().clone() for n, p in pl_module.student.named_parameters()})

    def on_train_start(self, trainer, pl_module) -> None:
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._take(pl_module)


def _changed(before: dict, after: dict) -> set[str]:
    out = set()
    for n in before:
        if not torch.equal(before[n], after[n]):
            out.add(n.split(".")[2] if n.startswith("model.layers.") else "outside")
    return out


@pytest.mark.parametrize("mode", ["drop_grads", "requires_grad"])
def test_group_finetune_trains_one_group_at_a_time(mode):
    from pruning.lightning.module import DistillationModule

    pl.seed_everything(0, verbose=False)
    module = DistillationModule(config=CFG, attn_implementation="eager", lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (16,), generator=g)} for _ in range(8)]
    snaps = Snapshots()
    cb = GroupFinetuneCallback(groups=2, steps_per_group=2, start_step=1, mode=mode)
    trainer = quiet_trainer(6, [cb, snaps])
    trainer.fit(module, DataLoader(data, batch_size=1))
    assert cb.layer_groups == [[0, 1], [2, 3]]
    s = snaps.states
    assert len(s) == 7
    assert _changed(s[0], s[1]) == {"0", "1", "2", "3", "outside"}  # step 0 < start_step: everything trains
    for step in (1, 2):
        assert _changed(s[step], s[step + 1]) == {"0", "1"}, step
    for step in (3, 4):
        assert _changed(s[step], s[step + 1]) == {"2", "3"}, step
    assert _changed(s[5], s[6]) == {"0", "1"}  # cycles back to the first group
    assert all(p.requires_grad for p in module.student.parameters())  # flags restored


def test_group_finetune_validates():
    with pytest.raises(ValueError, match="steps_per_group=0"):
        GroupFinetuneCallback(groups=2, steps_per_group=0)
    with pytest.raises(ValueError, match="mode='freeze'"):
        GroupFinetuneCallback(mode="freeze")
    cb = GroupFinetuneCallback(groups=3, steps_per_group=10, start_step=5, cycle=False)
    assert [cb.turn(s) for s in (0, 5, 14, 15, 34, 35)] == [None, 0, 0, 1, 2, None]


# ------------------------------------------------------------------------------------- quantized frozen groups
def test_int8_linear_round_trip_and_gradients():
    from pruning.quantize import dequantized, freeze_int8, is_int8, thaw

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[0, :3] = 0.0  # pruned weights
    ref = lin.weight.detach().clone()
    lin.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        freeze_int8(torch.nn.Linear(2, 2))
    freeze_int8(lin)
    assert lin.weight.dtype == torch.int8 and is_int8(lin)
    w = dequantized(lin)
    step = ref.abs().amax(1, keepdim=True) / 127
    assert ((w - ref).abs() <= step / 2 + 1e-7).all() and (w[0, :3] == 0).all()
    x = torch.randn(3, 5, 8, requires_grad=True)
    y = lin(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, w, lin.bias)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)  # the gradient flows through the int8 layer
    thaw(lin)
    assert lin.weight.dtype == torch.float32 and not is_int8(lin) and torch.equal(lin.weight, w)
    torch.testing.assert_close(lin(x2), y2)


class Int8Watch(pl.Callback):
    """Per optimiser step: the dtype of every layer's gate_proj weight and the dequantized values of all."""

    def __init__(self) -> None:
        self.dtypes: list[list[torch.dtype]] = []
        self.values: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from pruning.quantize import dequantized, is_int8

        lins = [layer.mlp.gate_proj for layer in pl_module.student.model.layers]
        self.dtypes.append([lin.weight.dtype for lin in lins])
        self.values.append([(dequantized(lin) if is_int8(lin) else lin.weight.detach()).clone() for lin in lins])


def test_group_finetune_with_quantized_frozen_groups(tmp_path):
    from pruning.lightning.module import DistillationModule

    pl.seed_everything(0, verbose=False)
    module = DistillationModule(config=CFG, attn_implementation="eager", lr=1e-2)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (16,), generator=g)} for _ in range(8)]
    watch = Int8Watch()
    cb = GroupFinetuneCallback(groups=2, steps_per_group=2, start_step=1, mode="requires_grad", quantize=True)

    class Save(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                trainer.save_checkpoint(str(tmp_path / "mid.ckpt"))

    trainer = quiet_trainer(5, [cb, watch, Save()])
    trainer.fit(module, DataLoader(data, batch_size=1))
    f32, i8 = torch.float32, torch.int8
    assert watch.dtypes[0] == [f32] * 4  # step 0: before start_step, everything full precision
    assert watch.dtypes[1] == watch.dtypes[2] == [f32, f32, i8, i8]  # group 0's turn: group 1 held as int8
    assert watch.dtypes[3] == watch.dtypes[4] == [i8, i8, f32, f32]
    v = watch.values
    assert not torch.equal(v[1][0], v[2][0])  # group 0 trains through the int8 layers after it
    assert torch.equal(v[1][2], v[2][2])  # the frozen group does not move while int8
    assert torch.equal(v[3][0], v[4][0])  # nor does group 0 once it is frozen in its turn ...
    half_step = v[2][0].abs().amax(1, keepdim=True) / 254
    assert ((v[3][0] - v[2][0]).abs() <= half_step + 1e-7).all()  # ... having taken the int8 rounding at the switch
    assert all(p.dtype == torch.float32 and p.requires_grad for p in module.student.parameters())  # restored
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float32 for t in saved.values())  # checkpoints hold dequantized weights
    with pytest.raises(ValueError, match="HINT: set mode: requires_grad"):
        GroupFinetuneCallback(quantize=True)


@pytest.mark.parametrize("event_step", [3, 1])  # 1: at start_step itself (the first turn may freeze groups first)
def test_group_finetune_quantize_refuses_a_later_pruning_event(event_step):
    from pruning.callbacks import ImportanceCallback, PruningCallback
    from pruning.lightning.module import DistillationModule
    from pruning.schedule import Schedule

    module = DistillationModule(config=CFG, attn_implementation="eager")
    cb = GroupFinetuneCallback(groups=2, steps_per_group=2, start_step=1, mode="requires_grad", quantize=True)
    pc = PruningCallback("magnitude", "mlp_neuron", Schedule(step=event_step, sparsity=0.25))
    trainer = pl.Trainer(accelerator="cpu", logger=False, max_steps=5, callbacks=[ImportanceCallback(), cb, pc])
    with pytest.raises(ValueError, match="HINT: set start_step after the last pruning event"):
        trainer.fit(module, DataLoader([{"input_ids": torch.zeros(16, dtype=torch.long)}] * 4, batch_size=1))


def _sigma_ddp_worker(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    from pruning.options import PruneOptions
    from pruning.pipeline import Pruner, collect_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = tiny_model("llama", 2)
        pruner = Pruner(model, PruneOptions(method="saap", granularity="mlp_neuron", sparsity=0.25))
        gradients = pruner.gradient_collector()
        window = get_criterion("saap", learn_sigma=True).batch_learner(pruner.targets.group_sets)
        for step in calib(8, seq=12, batch=2):  # a step: one sequence on each rank
            collect_gradients(model, [step[rank : rank + 1]], gradients, progress=False)
            window.close_batch(gradients)
        merged = window.merged_state_dict()
        window.reduce()
        if rank == 0:
            torch.save({"learned": window.learned(), "merged_seen": merged["seen"]}, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_sigma_window_over_two_ranks_equals_one_process(tmp_path):
    """Each rank closes its own share of every step; reduced, σ is what one process learns on whole steps."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = str(tmp_path / "rank0.pt")
    mp.start_processes(_sigma_ddp_worker, args=(port, path), nprocs=2, join=True, start_method="fork")
    got = torch.load(path)
    est = saap_scores(tiny_model("llama", 2), calib(8, seq=12, batch=2), "mlp_neuron", progress=False)
    assert got["learned"]["sigma"] == pytest.approx(est.criterion_options()["sigma"], rel=1e-5)
    assert got["merged_seen"] == 8  # the sample counts of both ranks, as the statistics' checkpoints merge them


def test_joint_granularity_refuses_what_it_cannot_honour():
    from pruning.options import SelectionOptions

    with pytest.raises(ValueError, match="min_keep / max_keep .* do not bound"):
        SelectionOptions(method="saap", granularity="mlp_neuron+attention_head", allocation="global", min_keep=0.9)
    with pytest.raises(ValueError, match="normalise='minmax'.*HINT: normalise: mean"):
        SelectionOptions(
            method="saap", granularity="mlp_neuron+attention_head", criterion_options={"normalise": "minmax"}
        )
    SelectionOptions(method="saap", granularity="mlp_neuron", criterion_options={"normalise": "minmax"})
