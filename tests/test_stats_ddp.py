"""Two gloo ranks, each on half the calibration sequences, reduce to the statistics of one process on all."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import calib, tiny_model

from pruning.pipeline import collect_gradients
from pruning.stats import ActivationCollector, GradientCollector
from pruning.structure import ModelStructure

GRAD_KINDS = ("sum", "sum_sq", "sum_abs", "sum_abs_gw")


def _batches():
    return calib(n=8, seq=12, seed=7)  # 4 batches of 2 sequences


def _statistics(batches) -> dict:
    model = tiny_model("llama", layers=2, seed=0)
    s = ModelStructure(model)
    act = ActivationCollector(s.targets()).attach()
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    act.detach()
    names = [n + ".weight" for n in s.targets() if ".layers.1." in n]
    group_sets = s.group_sets("mlp_neuron") + s.group_sets("attention_head")
    grads = GradientCollector(model, names, GRAD_KINDS, group_sets, ("coupled", "vector"))
    collect_gradients(model, batches, grads, progress=False)
    act.reduce()
    grads.reduce()
    return {"act": act.state_dict(), "grad": grads.state_dict()}


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        batches = _batches()
        mine = batches[rank::2]  # each rank: half of the sequences
        out = _statistics(mine)
        if rank == 0:
            torch.save(out, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _assert_same(got: dict, want: dict, prefix: str = "") -> None:
    assert set(got) == set(want), prefix
    for k in want:
        if isinstance(want[k], dict):
            _assert_same(got[k], want[k], f"{prefix}{k}/")
        elif torch.is_tensor(want[k]):
            assert got[k].dtype == torch.float32, prefix + k
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{prefix}{k}")
        else:
            assert got[k] == want[k], prefix + k


@pytest.mark.multiprocess
def test_two_rank_reduce_equals_one_process(tmp_path, free_port):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(free_port, path), nprocs=2, join=True)
    got = torch.load(path)
    want = _statistics(_batches())  # no process group here: reduce is a no-op
    # counts: tokens for activations, sequences for gradients
    assert want["act"]["model.layers.0.self_attn.q_proj"]["count"] == 8 * 12
    assert want["grad"]["model.layers.1.mlp.up_proj.weight"]["count"] == 8
    assert set(want["grad"]["model.layers.1.mlp.up_proj.weight"]["sums"]) == set(GRAD_KINDS)
    assert set(want["grad"]["mlp_neuron.0"]["sums"]) == {"coupled", "vector"}
    _assert_same(got, want)
    # the comparison is not vacuous: a single rank's half differs from the whole
    half = _statistics(_batches()[0::2])
    assert not torch.allclose(
        half["grad"]["mlp_neuron.1"]["sums"]["coupled"], want["grad"]["mlp_neuron.1"]["sums"]["coupled"]
    )


def test_reduce_without_process_group_is_noop():
    assert not dist.is_initialized()
    model = tiny_model("llama", layers=1)
    s = ModelStructure(model)
    act = ActivationCollector(s.targets()).attach()
    with torch.no_grad():
        model(input_ids=_batches()[0], use_cache=False)
    act.detach()
    before = {k: v["sums"]["sum_sq"].clone() for k, v in act.state_dict().items()}
    act.reduce()
    for k, v in act.state_dict().items():
        assert torch.equal(v["sums"]["sum_sq"], before[k])


# ---------------------------------------------------------------------------------------------- row-sharded (FSDP2)
ROWS, COLS, SAMPLES = 5, 3, 4  # 5 rows over 2 ranks: 3 + 2 (FSDP2's torch.chunk split, the last chunk padded)


def _grads_and_weight():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(ROWS, COLS, generator=g) for _ in range(2 * SAMPLES)]
    return grads, torch.randn(ROWS, COLS, generator=g)


def _sharded_worker(rank: int, port: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from pruning.distributed import RowShard
    from pruning.importance import ScoreContext
    from pruning.stats import GradientStats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        grads, w = _grads_and_weight()
        shard = RowShard.of(distribute_tensor(w, mesh, [Shard(0)]))
        tiny = RowShard.of(distribute_tensor(torch.ones(1, 2), mesh, [Shard(0)]))  # rank 1 holds no row
        out = {"shard": (shard.offset, shard.rows, shard.total), "tiny_rows": tiny.rows}
        stat = GradientStats(GRAD_KINDS)
        stat.set_shard(shard)
        for g in grads[rank::2][:2]:  # each rank: its own full per-sample gradients
            stat.update(g, w, scale=2.0)
        out["rows_shapes"] = {k: tuple(v.shape) for k, v in stat.sums.items()}
        merged = stat.merged_state_dict()  # a checkpoint mid-window: every rank's samples, whole
        out["merged"] = merged
        resumed = GradientStats(GRAD_KINDS)
        resumed.load_merged_state_dict(merged, rank)  # before the shard is known (as on resume)
        resumed.set_shard(shard)
        out["resumed_rows"] = {k: v.clone() for k, v in resumed.sums.items()}
        out["resumed_count"] = resumed.count
        for g in grads[rank::2][2:]:
            stat.update(g, w, scale=2.0)
            resumed.update(g, w, scale=2.0)
        stat.reduce()
        resumed.reduce()
        out["reduced"], out["resumed"] = stat.state_dict(), resumed.state_dict()
        # across modes: the sharded run's checkpoint resumed unsharded (DDP), and a DDP checkpoint resumed sharded
        ddp = GradientStats(GRAD_KINDS)
        ddp.load_merged_state_dict(merged, rank)
        plain = GradientStats(GRAD_KINDS)
        for g in grads[rank::2][:2]:
            plain.update(g, w, scale=2.0)
        to_fsdp = GradientStats(GRAD_KINDS)
        to_fsdp.load_merged_state_dict(plain.merged_state_dict(), rank)
        to_fsdp.set_shard(shard)
        for g in grads[rank::2][2:]:
            ddp.update(g, w, scale=2.0)
            to_fsdp.update(g, w, scale=2.0)
        ddp.reduce()
        to_fsdp.reduce()
        out["fsdp_to_ddp"], out["ddp_to_fsdp"] = ddp.state_dict(), to_fsdp.state_dict()
        stat.reset()
        out["after_reset"] = dict(stat.sums)
        # lazily reduced (an event scoring one layer at a time): counts summed, rows kept until gather()
        lazy = GradientStats(GRAD_KINDS)
        lazy.set_shard(shard)
        for g in grads[rank::2]:
            lazy.update(g, w, scale=2.0)
        lazy.reduce(lazy=True)
        out["lazy_rows"] = (lazy.on_rows, lazy.count, {k: tuple(v.shape) for k, v in lazy.sums.items()})
        out["lazy_merged"] = lazy.merged_state_dict()
        out["lazy_gathered"] = (lazy.gather(), lazy.gather())  # the second: whole already, nothing to gather
        out["lazy_whole"] = lazy.state_dict()
        lazy.release()
        out["lazy_released"] = (lazy.on_rows, {k: tuple(v.shape) for k, v in lazy.sums.items()})
        with pytest.raises(RuntimeError, match=r"held on this rank's rows .*HINT: read them inside"):
            ScoreContext(weights={}, grad={"w": lazy}).grad_stat("w", "sum")
        t = GradientStats(("sum",))
        t.set_shard(tiny)
        t.update(torch.full((1, 2), float(rank + 1)))
        out["tiny_local"] = t.sums["sum"].clone()
        t.reduce()
        out["tiny"] = t.sums["sum"].clone()
        torch.save(out, f"{path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_row_sharded_gradient_statistics(tmp_path, free_port):
    """Each rank keeps only its rows of Σ (reduce-scattered per sample); reduce gathers the sums of one process that
    saw every sample; a merged (checkpoint) state resumes on the rows, and across modes (sharded ↔ DDP)."""
    from pruning.stats import GradientStats

    path = str(tmp_path / "out")
    mp.spawn(_sharded_worker, args=(free_port, path), nprocs=2, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]
    grads, w = _grads_and_weight()
    want = GradientStats(GRAD_KINDS)
    half = GradientStats(GRAD_KINDS)
    for i, g in enumerate(grads):
        want.update(g, w, scale=2.0)
        if i < 4:  # each rank's first 2 samples: what the checkpoint holds
            half.update(g, w, scale=2.0)
    assert [r["shard"] for r in ranks] == [(0, 3, 5), (3, 2, 5)]
    assert [r["tiny_rows"] for r in ranks] == [1, 0]
    for r, (off, n, _) in zip(ranks, [x["shard"] for x in ranks]):
        assert r["rows_shapes"] == {k: (n, COLS) for k in GRAD_KINDS}  # rows only, during the window
        assert r["merged"]["count"] == 4 and r["merged"]["rows_sharded"]
        for k in GRAD_KINDS:
            torch.testing.assert_close(r["merged"]["sums"][k], half.sums[k], msg=k)
            torch.testing.assert_close(r["resumed_rows"][k], half.sums[k][off : off + n], msg=k)
        assert r["resumed_count"] == (4 if r is ranks[0] else 0)
        for state in (r["reduced"], r["resumed"], r["fsdp_to_ddp"], r["ddp_to_fsdp"]):
            assert state["count"] == 2 * SAMPLES and not state["rows_sharded"]
            for k in GRAD_KINDS:
                torch.testing.assert_close(state["sums"][k], want.sums[k], rtol=1e-5, atol=1e-6, msg=k)
        assert r["after_reset"] == {}
        rows = {k: (n, COLS) for k in GRAD_KINDS}
        assert r["lazy_rows"] == (True, 2 * SAMPLES, rows) and r["lazy_released"] == (True, rows)
        assert r["lazy_gathered"] == (True, False)
        for state in (r["lazy_whole"], r["lazy_merged"]):
            assert state["count"] == 2 * SAMPLES and state["rows_sharded"] == (state is r["lazy_merged"])
            for k in GRAD_KINDS:
                torch.testing.assert_close(state["sums"][k], want.sums[k], rtol=1e-5, atol=1e-6, msg=k)
    assert ranks[0]["tiny_local"].tolist() == [[3.0, 3.0]] and ranks[1]["tiny_local"].shape == (0, 2)
    assert ranks[0]["tiny"].tolist() == ranks[1]["tiny"].tolist() == [[3.0, 3.0]]
