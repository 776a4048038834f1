"""FSDP2 through Lightning's ModelParallelStrategy (2 CPU ranks, gloo): statistics, group scores and masks equal a
single process on the same sequences, masked weights stay zero through recovery on the sharded weights, a resumed
sharded run ends with the same masks, and the export gathered from the shards equals a single-process export.

The 2-rank runs are ``tests/fsdp_script.py`` in a subprocess (Lightning starts rank 1 by re-running the command).
Rank r sees sequences r, r + 2, ..., in micro-batches of 2; the single-process reference sees both in one optimiser
step with ``accumulate_grad_batches=2``, so both score the same sequences at the same steps (as in
test_lightning_ddp.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fsdp_script import LORA_SAVE, LORA_SCHEDULES, MOE, MOE_BATCH, RESUME, SCHEDULES, run  # noqa: E402
from test_lightning import CFG, LORA, SEQS, assert_pruned_zero, assert_same_masks, assert_same_stats, module  # noqa: E402

from pruning import MaskSet, ModelStructure, compact, prune, save_pretrained  # noqa: E402
from pruning.options import PruneOptions, SelectionOptions  # noqa: E402
from pruning.pipeline import Pruner, prune_from_statistics  # noqa: E402

SCRIPT = Path(__file__).parent / "fsdp_script.py"
# weights after recovery steps (AdamW, lr 1e-2): the ranks' means of 2 sequences averaged vs one process's
# accumulated micro-batches sum in another order, and AdamW's normalisation lifts that rounding to up to ~1e-5 on
# weights with tiny gradients; a gradient in a wrong direction is off by a good part of an update (~1e-2)
WEIGHT_ATOL = 5e-5


def _assert_same_weights(got: dict, want: dict, masks) -> None:
    """The weights gathered from the shards equal one process's (fp32 tolerance), pruned entries exactly zero."""
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=WEIGHT_ATOL, msg=k)
    m = module()
    m.student.load_state_dict(got)
    assert_pruned_zero(m.student, masks)


def _two_ranks(tmp_path: Path, criterion: str, mode: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), criterion, mode],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"{mode}_rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    return ranks


def _masks(state: dict) -> MaskSet:
    out = MaskSet()
    out.load_state_dict(state)
    return out


def _export(weights: dict, masks_state: dict, path: Path, **module_kw) -> Path:
    """The single-process export path (ExportOnFitEnd without FSDP): a plain model, compacted, written."""
    m = module(**module_kw)
    m.student.load_state_dict(weights)
    masks = _masks(masks_state)
    if masks.groups:
        compact(m.student, masks)
    return save_pretrained(m.student, path)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("criterion", list(SCHEDULES))
def test_fsdp_two_ranks_equal_one_process(tmp_path, criterion):
    ranks = _two_ranks(tmp_path, criterion, "full")
    want = run(criterion, world=1)
    n_events = len(SCHEDULES[criterion][1])
    want_masks = _masks(want["masks"])
    for r in ranks:
        info = r["info"]
        # sharded by rows over the 2 ranks; the mask of a sharded weight is a DTensor with its placements
        assert info["dtensor"] and info["placements"] == ["S(0)"], info
        assert info["local_shape"][0] * 2 == info["global_shape"][0]
        assert info["mask_dtensor"] and info["mask_placements"] == info["placements"]
        assert not info["local_weight"][~info["mask_local"]].any()  # pruned entries of the local shard are 0
        # statistics: each rank scored 2 micro-batches of 2 of the 8 sequences of every window; summed over ranks =
        # one process
        assert [h["micro_batches_scored_on_rank"] for h in r["history"]] == [2] * n_events
        assert all(v["count"] == 8 for s in want["snapshots"] for v in s["gradients"].values())
        # uniform allocation: the event unsharded one decoder layer at a time, not the whole model
        assert [h["unsharded_for_scoring"] for h in r["history"]] == ["layer"] * n_events
        # scoring steps (weights frozen): FSDP2 reduce-scattered no gradient; recovery steps have theirs
        scoring = [g for _, active, g in r["grads_at_step"] if active]
        recovery = [g for _, active, g in r["grads_at_step"] if not active]
        assert scoring and not any(scoring) and recovery and all(recovery), r["grads_at_step"]
        assert len(r["snapshots"]) == n_events
        for got, exp in zip(r["snapshots"], want["snapshots"]):
            for kind in ("activations", "gradients"):  # gradients: element Σg² or the coupled group scores
                assert (got[kind] is None) == (exp[kind] is None)
                if exp[kind] is not None:
                    assert_same_stats(got[kind], exp[kind], kind + "/")
        assert_same_masks(_masks(r["masks"]), want_masks)
        if criterion == "gblm":  # per-weight Σg² held on the rank's rows of each weight, whole in one process
            rows = {k: v["sums"]["sum_sq"].shape[0] for k, v in want["snapshots"][0]["gradients"].items()}
            mine = {k: (n + 1) // 2 if r["rank"] == 0 else n // 2 for k, n in rows.items()}  # torch.chunk split
            assert r["held"] and all(s["sum_sq"][0] == mine[k] for h in r["held"] for k, s in h.items()), r["held"]
            assert all(s["sum_sq"][0] == rows[k] for h in want["held"] for k, s in h.items())
            # after the event each rank holds its rows only of every element mask (the rows of the whole mask)
            whole = r["masks"]["element"]
            assert info["element_held"] and set(info["element_held"]) == set(whole)
            for k, ((first, n), held) in info["element_held"].items():
                assert held.shape[0] == n < whole[k].shape[0], (k, tuple(held.shape))
                assert torch.equal(held, whole[k][first : first + n]), k
            # ... and gathered whole one decoder layer at a time at the event: when a criterion reads a weight's
            # statistics, only its layer's are whole (the whole model's at once would hold every layer's)
            layer_of = ModelStructure(module().student).layer_of
            reads = r["whole_at_read"]
            assert {n for n, _ in reads} == set(rows), reads
            for name, whole in reads:
                assert name in whole and {layer_of(n) for n in whole} == {layer_of(name)}, (name, whole)
    if criterion == "sdm":  # the lifted teacher (alpha > 0 in the second window) ran on the sharded weights
        assert ranks[0]["teacher_stash"]
    # recovery steps on the shards (gradients reduce-scattered, averaged) = one process's accumulated steps
    got_w = ranks[0]["weights"]  # gathered to rank 0
    _assert_same_weights(got_w, want["weights"], want_masks)

    # export: the files gathered from the shards = the single-process export of the same weights and masks
    fsdp_dir = tmp_path / "export_fsdp"
    same = _export(got_w, ranks[0]["masks"], tmp_path / "export_same")
    got_t, same_t = _tensors(fsdp_dir), _tensors(same)
    assert set(got_t) == set(same_t)
    for k in same_t:
        assert torch.equal(got_t[k], same_t[k]), k
    assert json.loads((fsdp_dir / "config.json").read_text()) == json.loads((same / "config.json").read_text())
    # ... and close to the export of the single-process run (same masks, weights equal up to fp32 reduction order)
    ref_t = _tensors(_export(want["weights"], want["masks"], tmp_path / "export_single"))
    assert {k: v.shape for k, v in ref_t.items()} == {k: v.shape for k, v in got_t.items()}
    for k in ref_t:
        torch.testing.assert_close(got_t[k], ref_t[k], rtol=1e-4, atol=WEIGHT_ATOL, msg=k)
    if criterion == "sdm":
        cfg = json.loads((fsdp_dir / "config.json").read_text())
        assert cfg["intermediate_size"] < CFG["intermediate_size"] or "intermediate_sizes" in str(cfg)


@pytest.mark.multiprocess
@pytest.mark.parametrize("criterion", list(RESUME))
def test_fsdp_resume_mid_window(tmp_path, criterion):
    """A run stopped at step 3, inside a scoring window (sdm: event 2 at step 4, step 2 scored before the checkpoint
    and step 3 after; gblm: its event at step 4, steps 0-2 before, with row-sharded Σg²), saved as a sharded
    checkpoint and resumed in a new trainer ends with the single-process masks and weights."""
    ranks = _two_ranks(tmp_path, criterion, "resume")
    assert (tmp_path / "ckpt").is_dir()  # a distributed checkpoint: one shard file per rank + metadata
    want = run(criterion, world=1, schedules=RESUME)
    steps = [e.step for e in RESUME[criterion][1]]
    for r in ranks:
        assert [h["step"] for h in r["first_history"]] == [s for s in steps if s <= 2]
        assert r["global_step"] == 6
        assert [h["step"] for h in r["history"]] == steps
        assert_same_masks(_masks(r["masks"]), _masks(want["masks"]))
        # the second event's statistics: the pre-checkpoint half (rank 0 holds both ranks' sums) + the rest
        assert_same_stats(r["snapshots"][-1]["gradients"], want["snapshots"][-1]["gradients"], "gradients/")
    for k, v in want["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][k], v, rtol=1e-4, atol=WEIGHT_ATOL, msg=k)


class _Mesh:
    """What ModelParallelStrategy builds with its defaults on one node of 2 devices: data 1 × tensor 2."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")
    shape = (1, 2)

    def __getitem__(self, name):
        size = dict(zip(self.mesh_dim_names, self.shape))[name]
        return type("Sub", (), {"size": lambda self: size})()


def test_tensor_parallel_default_mesh_is_refused():
    m = module()
    m._device_mesh = _Mesh()
    with pytest.raises(ValueError, match="tensor_parallel_size=2.*HINT: set strategy.init_args.data_parallel_size"):
        m.configure_model()
    m._device_mesh = None
    m.configure_model()  # no mesh (any other strategy): nothing to do


def _placeholders(model, structure):
    """Emulates FSDP2 outside a layer's scope: every parameter is a zero placeholder; ``scope(i)`` registers layer
    ``i``'s real parameters (``None``: those outside the layers) for the block, as ``unshard`` does."""
    real = dict(model.named_parameters())
    entered = []

    def put(names, source):
        for n in names:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, source(n))

    fake = {n: torch.nn.Parameter(torch.zeros_like(p)) for n, p in real.items()}
    put(real, fake.get)

    @contextmanager
    def scope(i):
        names = [n for n in real if structure.layer_of(n) == i]
        entered.append(i)
        put(names, real.get)
        try:
            yield
        finally:
            put(names, fake.get)

    return scope, entered


@pytest.mark.parametrize("granularity", ["unstructured", "mlp_neuron"])
def test_layer_scope_reads_each_layer_inside_its_scope(granularity):
    """``prune_from_statistics(layer_scope=...)`` scores layer i with the parameters registered inside scope i
    (outside it, here, only zeros): the masks equal those of the whole model at once."""
    from tiny import tiny_model

    options = PruneOptions(
        method="magnitude", sparsity=0.5, granularity=granularity, include_lm_head=granularity == "unstructured"
    )
    want = prune(tiny_model("llama", layers=2, seed=1), options=options, progress=False)
    model = tiny_model("llama", layers=2, seed=1)
    scope, entered = _placeholders(model, ModelStructure(model))
    pruner = Pruner(model, options)
    prune_from_statistics(pruner, layer_scope=scope)
    got = pruner.result()
    assert entered == ([0, 1, None] if granularity == "unstructured" else [0, 1])
    assert_same_masks(got.masks, want.masks)


def test_layer_scope_only_where_layers_are_scored_alone():
    def alone(method, granularity, allocation, scope):
        rates = [0.5, 0.5] if allocation == "rates" else None
        return SelectionOptions(
            method, granularity, allocation=allocation, scope=scope, layer_rates=rates
        ).scores_layers_alone

    assert alone("gblm", "unstructured", "uniform", "row")
    assert alone("sdm", "mlp_neuron", "rates", None)
    assert not alone("gblm", "unstructured", "global", "row")
    assert not alone("gblm", "unstructured", "uniform", "global")
    assert not alone("sdm", "mlp_neuron", "owl", None)
    assert not alone("magnitude", "layer", "uniform", None)
    assert not alone("sparsegpt", "unstructured", "uniform", "row")  # rewrites the weights
    model = module().student
    pruner = Pruner(
        model, PruneOptions(method="magnitude", sparsity=0.5, granularity="mlp_neuron", allocation="global")
    )
    with pytest.raises(ValueError, match="needs every layer's weights at once. HINT"):
        prune_from_statistics(pruner, layer_scope=lambda i: contextlib.nullcontext())


@pytest.mark.multiprocess
@pytest.mark.parametrize("source", ["meta", "meta_pretrained"])
def test_fsdp_meta_device_init_gives_the_same_masks_and_export(tmp_path, source):
    """``meta_init``: the student built on the meta device, sharded, then each rank loads its rows (of the
    checkpoint's safetensors, or broadcast from rank 0's initialisation): the same masks, weights and export as the
    2-rank run that builds the whole model on every rank."""
    save_pretrained(module().student, tmp_path / "checkpoint")  # the same weights as the config's initialisation
    want = _two_ranks(tmp_path, "sdm", "full")
    got = _two_ranks(tmp_path, "sdm", source)
    for g, w in zip(got, want):
        assert_same_masks(_masks(g["masks"]), _masks(w["masks"]))
    assert set(got[0]["weights"]) == set(want[0]["weights"])
    for k, v in want[0]["weights"].items():
        assert torch.equal(got[0]["weights"][k], v), k
    a, b = _tensors(tmp_path / f"export_{source}"), _tensors(tmp_path / "export_fsdp")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.multiprocess
@pytest.mark.parametrize("criterion,mode", [("wanda", "lora"), ("magnitude", "lora_meta")])
def test_fsdp_lora_equals_one_process(tmp_path, criterion, mode):
    """LoRA recovery on the sharded student (adapters sharded with their layer, their updates masked, merged on each
    rank's rows at the end of fit): the same adapters, merged weights and export as LoRA on one process, and the
    pruned weights exactly zero after the merge. ``lora_meta``: the 2-rank student built on the meta device
    (adapters written from the seed after sharding, base weights broadcast from rank 0's initialisation)."""
    assert set(LORA_SCHEDULES) == {"wanda", "magnitude"}
    ranks = _two_ranks(tmp_path, criterion, mode)
    want = run(criterion, world=1, schedules=LORA_SCHEDULES, lora=LORA, teacher="none")
    want_masks = _masks(want["masks"])
    lora_names = sorted(n for n in want["adapters"] if "lora_" in n)
    assert lora_names and all(not want["adapters"][n][0] for n in lora_names)
    for r in ranks:
        assert_same_masks(_masks(r["masks"]), want_masks)
        assert sorted(n for n in r["adapters"] if "lora_" in n) == lora_names
        for n, (dtensor, shape, local_shape, _) in r["adapters"].items():  # adapters and base weights sharded by rows
            assert dtensor and local_shape[0] == (shape[0] + 1 - r["rank"]) // 2, (n, shape, local_shape)
    # before the merge: the adapters trained on 2 ranks (their rows put together) = the adapters of one process
    trained_b = 0
    for n in lora_names:
        whole = torch.cat([r["adapters"][n][3] for r in ranks])
        torch.testing.assert_close(whole, want["adapters"][n][3], rtol=1e-4, atol=WEIGHT_ATOL, msg=n)
        trained_b += "lora_B" in n and bool(whole.count_nonzero())
    assert trained_b > 0  # B starts at zero: the adapters did train, so the merge changes the weights
    # merged at the end of fit: plain names, the same weights as the single-process merge, pruned entries exactly 0
    got_w = ranks[0]["weights"]
    assert not any("lora_" in k or "base_layer" in k for k in got_w)
    _assert_same_weights(got_w, want["weights"], want_masks)
    down = "model.layers.0.mlp.down_proj"
    before = torch.cat([r["adapters"][down + ".base_layer.weight"][3] for r in ranks])
    keep = want_masks.keep_mask(down + ".weight", before)
    assert not torch.equal(got_w[down + ".weight"][keep], before[keep])  # the merge added the adapters' update
    # the export written from the shards = the single-process export of the same weights (byte for byte), and close
    # to the single-process run's export
    got_t = _tensors(tmp_path / "export_lora")
    same_t = _tensors(_export(got_w, ranks[0]["masks"], tmp_path / "export_same"))
    assert set(got_t) == set(same_t) and all(torch.equal(got_t[k], same_t[k]) for k in same_t)
    ref_t = _tensors(_export(want["weights"], want["masks"], tmp_path / "export_single"))
    assert {k: v.shape for k, v in ref_t.items()} == {k: v.shape for k, v in got_t.items()}
    for k in ref_t:
        torch.testing.assert_close(got_t[k], ref_t[k], rtol=1e-4, atol=WEIGHT_ATOL, msg=k)


@pytest.mark.multiprocess
def test_fsdp_lora_resume_equals_one_process(tmp_path):
    """LoRA recovery on the sharded student, checkpointed at step LORA_SAVE while the adapters train (a distributed
    checkpoint of the sharded adapters, base weights and AdamW state), interrupted there and resumed in a new trainer:
    the adapters before the merge, the merged weights and the export equal one uninterrupted process's."""
    ranks = _two_ranks(tmp_path, "magnitude", "lora_resume")
    assert (tmp_path / "ckpt").is_dir()
    want = run("magnitude", world=1, schedules=LORA_SCHEDULES, lora=LORA, teacher="none")
    want_masks = _masks(want["masks"])
    lora_names = sorted(n for n in want["adapters"] if "lora_" in n)
    for r in ranks:
        assert r["first_step"] == LORA_SAVE and [h["step"] for h in r["first_history"]] == [2]
        assert r["global_step"] == 6 and [h["step"] for h in r["history"]] == [2]  # the event came back, not redone
        assert [step for step, _, _ in r["grads_at_step"]] == [4, 5]  # the new trainer ran the last 2 steps only
        assert_same_masks(_masks(r["masks"]), want_masks)
        assert sorted(n for n in r["adapters"] if "lora_" in n) == lora_names
    for n in lora_names:  # the adapters trained before the checkpoint and after the resume = one process's
        whole = torch.cat([r["adapters"][n][3] for r in ranks])
        torch.testing.assert_close(whole, want["adapters"][n][3], rtol=1e-4, atol=WEIGHT_ATOL, msg=n)
    got_w = ranks[0]["weights"]
    assert not any("lora_" in k or "base_layer" in k for k in got_w)
    _assert_same_weights(got_w, want["weights"], want_masks)
    got_t = _tensors(tmp_path / "export_lora_resume")
    ref_t = _tensors(_export(want["weights"], want["masks"], tmp_path / "export_single"))
    assert {k: v.shape for k, v in ref_t.items()} == {k: v.shape for k, v in got_t.items()}
    for k in ref_t:
        torch.testing.assert_close(got_t[k], ref_t[k], rtol=1e-4, atol=WEIGHT_ATOL, msg=k)


@pytest.mark.multiprocess
@pytest.mark.parametrize("criterion", list(MOE))
def test_fsdp_moe_two_ranks_equal_one_process(tmp_path, criterion):
    """A tiny Mixtral under FSDP2: its 3-D expert weights sharded by experts (2 of the 4 on each rank); the masks
    (whole experts by REAP, expert neurons by Taylor), the recovered weights, the masked model's logits (the masked
    router's choice among the kept experts) and the export gathered from the shards equal one process's."""
    from tiny import tiny_config_dict

    cfg = tiny_config_dict("mixtral")
    granularity = MOE[criterion][0]
    ranks = _two_ranks(tmp_path, criterion, "moe")
    want = run(criterion, world=1, schedules=MOE, batch=MOE_BATCH[criterion], config=cfg)
    want_masks = _masks(want["masks"])
    for r in ranks:
        info = r["info"]  # model.layers.0.mlp.experts.down_proj [4 experts, hidden, neurons]: 2 experts per rank
        assert info["dtensor"] and info["placements"] == ["S(0)"], info
        assert info["global_shape"] == (4, 32, 32) and info["local_shape"] == (2, 32, 32), info
        assert info["mask_dtensor"] and info["mask_placements"] == info["placements"]
        assert not info["local_weight"][~info["mask_local"]].any()  # pruned entries of the local shard are 0
        assert [h["micro_batches_scored_on_rank"] for h in r["history"]] == [2]
        for got, exp in zip(r["snapshots"], want["snapshots"], strict=True):
            for kind in ("activations", "gradients"):
                assert (got[kind] is None) == (exp[kind] is None)
                if exp[kind] is not None:
                    assert_same_stats(got[kind], exp[kind], kind + "/")
        assert_same_masks(_masks(r["masks"]), want_masks)
        torch.testing.assert_close(r["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    # the statistics the criterion read: REAP's routing (activations), Taylor's gradients of the 3-D weights
    kind = "activations" if criterion == "reap" else "gradients"
    assert want["snapshots"][0][kind]
    groups = {k: v for k, v in want_masks.groups.items() if k.startswith("expert")}
    assert groups and all((~g).any() for g in groups.values()), want_masks.groups.keys()
    got_w = ranks[0]["weights"]
    assert set(got_w) == set(want["weights"])
    for k, v in want["weights"].items():
        torch.testing.assert_close(got_w[k], v, rtol=1e-4, atol=WEIGHT_ATOL, msg=k)
    m = module(config=cfg)
    m.student.load_state_dict(got_w)
    assert_pruned_zero(m.student, want_masks)
    # export gathered from the shards = the single-process export of the same weights and masks, and close to the
    # single-process run's export
    fsdp_dir = tmp_path / "export_moe"
    got_t = _tensors(fsdp_dir)
    same = _export(got_w, ranks[0]["masks"], tmp_path / "export_same", config=cfg)
    same_t = _tensors(same)
    assert set(got_t) == set(same_t) and all(torch.equal(got_t[k], same_t[k]) for k in same_t)
    exported = json.loads((fsdp_dir / "config.json").read_text())
    assert exported == json.loads((same / "config.json").read_text())
    ref_t = _tensors(_export(want["weights"], want["masks"], tmp_path / "export_single", config=cfg))
    assert {k: v.shape for k, v in ref_t.items()} == {k: v.shape for k, v in got_t.items()}
    for k in ref_t:
        torch.testing.assert_close(got_t[k], ref_t[k], rtol=1e-4, atol=WEIGHT_ATOL, msg=k)
    # the export reloaded computes what the sharded masked model did (its router chooses among the kept experts)
    from pruning.surgery.export import load_pretrained

    loaded = load_pretrained(fsdp_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = loaded(input_ids=torch.stack(SEQS[:4])).logits
    torch.testing.assert_close(logits, ranks[0]["logits"], rtol=1e-4, atol=1e-4)
    # written in the checkpoint's layout, one w1/w2/w3 per expert (w2: hidden x neurons)
    down = [v for k, v in got_t.items() if k.startswith("model.layers.0.block_sparse_moe.experts.") and "w2" in k]
    if granularity == "expert":  # 3 of 4 experts kept in each layer
        assert exported["num_local_experts"] == 3 and len(down) == 3, (exported, len(down))
    else:  # 32 neurons an expert at 25 %: fewer in the export
        assert len(down) == 4 and sum(d.shape[1] for d in down) < 4 * 32, [d.shape for d in down]
