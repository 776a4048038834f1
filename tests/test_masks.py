"""MaskSet's public surface: attach state, parameter resolution, reset after surgery, the stash's size, and the
cross-rank broadcast of masks and rewritten weights (2 gloo ranks)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pruning.distributed import broadcast_parameters
from pruning.masks import MaskSet
from pruning.stats import GradientCollector
from pruning.structure import GroupSet, Member


class Two(nn.Module):
    """Two bias-free Linears: ``a`` (4 → 2) and ``b`` (2 → 4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 2, bias=False)
        self.b = nn.Linear(2, 4, bias=False)


def _neurons() -> GroupSet:
    """The 2 hidden units of ``Two``: rows of ``a``, columns of ``b``."""
    return GroupSet("mlp_neuron", 0, 2, (Member("a.weight", 0, 1), Member("b.weight", 1, 1)), 1, (8, 8))


def test_attached_follows_attach_and_detach():
    model, masks = Two(), MaskSet()
    masks.set_element("a.weight", torch.ones(2, 4, dtype=torch.bool))
    assert not masks.attached
    masks.attach(model)
    assert masks.attached
    masks.detach()
    assert not masks.attached


def test_resolve_names_the_masked_parameters_sorted():
    model, masks = Two(), MaskSet()
    masks.set_groups(_neurons(), torch.tensor([True, False]))
    got = masks.resolve(model)
    assert list(got) == ["a.weight", "b.weight"] and got["b.weight"] is model.b.weight
    masks.set_element("c.weight", torch.ones(1, dtype=torch.bool))
    with pytest.raises(KeyError, match="c.weight"):
        masks.resolve(model)


def test_stash_bytes_counts_pruned_values_and_factors():
    model, masks = Two(), MaskSet()
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    masks.set_element("a.weight", keep)
    assert masks.stash_bytes() == 0
    masks.apply(model, keep_original=True)
    assert masks.stash_bytes() == 3 * 4 + 8  # 3 pruned fp32 values, the 2x4 boolean factor
    masks.set_groups(_neurons(), torch.tensor([True, False]))
    masks.apply(model, keep_original=True)
    # a: 5 pruned values (1 + the whole second row), its element mask and its group factor (2 rows); b: 4 values
    # (the second column), its group factor (2 columns)
    assert masks.stash_bytes() == (5 * 4 + 8 + 2) + (4 * 4 + 2)


def test_reset_to_keeps_element_masks_only():
    model, masks = Two(), MaskSet()
    masks.set_groups(_neurons(), torch.tensor([True, False]))
    masks.apply(model, keep_original=True)
    masks.attach(model)
    keep = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 1]], dtype=torch.bool)
    masks.detach()
    masks.reset_to({"b.weight": keep})
    assert masks.element == {"b.weight": keep} and not masks.groups and not masks.group_sets
    assert not masks.has_original and masks.stash_bytes() == 0 and masks.names() == {"b.weight"}
    with torch.no_grad():
        model.b.weight.fill_(1.0)
    masks.reapply()  # no parameter is bound any more: nothing happens
    assert bool((model.b.weight == 1).all())
    masks.attach(model)
    assert torch.equal(model.b.weight != 0, keep) and list(masks.resolve(model)) == ["b.weight"]


def test_broadcast_without_process_group_changes_nothing():
    assert not dist.is_initialized()
    model, masks = Two(), MaskSet()
    masks.set_element("a.weight", torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool))
    before = masks.element["a.weight"].clone()
    assert masks.broadcast_() is False
    assert torch.equal(masks.element["a.weight"], before)
    weight = model.a.weight.detach().clone()
    broadcast_parameters(model, ["a.weight"])
    assert torch.equal(model.a.weight, weight)


def test_gradient_collector_parameters_are_element_and_group_members():
    model = Two()
    collector = GradientCollector(model, ["b.weight"], group_sets=[_neurons()])
    got = collector.parameters
    assert list(got) == ["b.weight", "a.weight"]
    assert got["a.weight"] is model.a.weight and got["b.weight"] is model.b.weight


# ---------------------------------------------------------------------------------------------- 2 gloo ranks
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_masks(rank: int) -> MaskSet:
    """Masks that differ between the ranks (as a last-bit tie can make them)."""
    masks = MaskSet()
    masks.set_element("a.weight", torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool) ^ bool(rank))
    masks.set_groups(_neurons(), torch.tensor([True, False]) ^ bool(rank))
    return masks


def _broadcast_worker(rank: int, port: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = {}
        masks = _rank_masks(rank)
        out["changed"] = masks.broadcast_()
        out["again"] = masks.broadcast_()  # bit-equal now: nothing changes
        out["element"], out["groups"] = masks.element["a.weight"].clone(), masks.groups["mlp_neuron.0"].clone()
        # b's weight row-sharded (FSDP2's layout): its element mask is held as this rank's rows once attached
        model = Two()
        mesh = init_device_mesh("cpu", (2,))
        model.b.weight = nn.Parameter(distribute_tensor(model.b.weight.detach(), mesh, [Shard(0)]))
        sharded = MaskSet()
        sharded.set_element("b.weight", torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.bool))
        sharded.set_element("a.weight", torch.ones(2, 4, dtype=torch.bool) ^ bool(rank))
        sharded.attach(model)
        out["held"] = (sharded.held_as_rows("b.weight"), sharded.held_as_rows("a.weight"))
        out["changed_sharded"] = sharded.broadcast_()
        out["rows"] = sharded.element["b.weight"].clone()
        out["a_sharded"] = sharded.element["a.weight"].clone()
        sharded.detach()
        with pytest.raises(ValueError, match=r"sharded parameters \['b.weight'\].*HINT"):
            broadcast_parameters(model, ["b.weight"])
        with torch.no_grad():
            model.a.weight.fill_(float(rank + 1))
        broadcast_parameters(model, ["a.weight"], src=1)
        out["weight"] = model.a.weight.detach().clone()
        torch.save(out, f"{path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_broadcast_makes_rank_zero_masks_everywhere(tmp_path):
    path = str(tmp_path / "out")
    mp.spawn(_broadcast_worker, args=(_free_port(), path), nprocs=2, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]
    want = _rank_masks(0)
    assert [r["changed"] for r in ranks] == [False, True] and [r["again"] for r in ranks] == [False, False]
    for r in ranks:
        assert torch.equal(r["element"], want.element["a.weight"])
        assert torch.equal(r["groups"], want.groups["mlp_neuron.0"])
        assert r["held"] == (True, False)
        assert torch.equal(r["a_sharded"], torch.ones(2, 4, dtype=torch.bool))  # rank 0's, where rank 1 had zeros
        assert torch.equal(r["weight"], torch.full((2, 4), 2.0))  # rank 1's values, src=1
    assert [r["changed_sharded"] for r in ranks] == [False, True]
    # the rows held stay each rank's own rows (FSDP2 split of 4 rows: 2 + 2), not rank 0's
    assert ranks[0]["rows"].tolist() == [[True, False], [False, True]]
    assert ranks[1]["rows"].tolist() == [[True, True], [False, False]]
