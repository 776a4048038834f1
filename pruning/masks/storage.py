"""Building and storing keep masks: element masks, group keep-vectors, their factors, counts and checkpointed state.

The base of :class:`~pruning.masks.MaskSet`. Masks are stored whole (element masks at the parameter's global shape,
group keep-vectors as they are) until :meth:`KeepMasks._cut_to_rows` keeps only this rank's rows of the element
mask of a row-sharded parameter (:class:`~pruning.distributed.RowShard`); what needs such a mask whole gathers the
rows, a collective every rank runs in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import RowShard, comm_device, from_local_like, is_dtensor, local, local_part, shard_like
from ..structure import GroupSet, Member, named_parameters


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive input columns of each row (2:4, 4:8)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"N:M {n}:{m} needs in_features divisible by {m}, got {in_f}")
    blocks = scores.reshape(out_f, in_f // m, m)
    idx = blocks.topk(n, dim=-1).indices
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(out_f, in_f)


def _sum_over(rows: RowShard, count: int, device: torch.device) -> int:
    """``count`` summed over the ranks of ``rows``' group (collective)."""
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=rows.group)
    return int(t.item())


class KeepMasks:
    """Keep masks (True = kept) by parameter name: element masks and group keep-vectors with their group sets."""

    def __init__(self) -> None:
        self.element: dict[str, torch.Tensor] = {}
        self.groups: dict[str, torch.Tensor] = {}
        self.group_sets: dict[str, GroupSet] = {}
        # element masks held as this rank's rows only (row-sharded parameters, from attach on): name -> the rows
        self._rows: dict[str, RowShard] = {}

    # ------------------------------------------------------------------ building
    def set_element(self, name: str, keep: torch.Tensor, monotone: bool = True) -> None:
        keep = keep.to(torch.bool)
        old = self.element.get(name)
        if name in self._rows:  # a new mask is built whole: the rows held are gathered (collective)
            old = self._whole(name)
            del self._rows[name]
        if monotone and old is not None:
            keep = keep.to(old.device) & old
        self.element[name] = keep

    def set_groups(self, gs: GroupSet, keep: torch.Tensor, monotone: bool = True) -> None:
        keep = keep.to(torch.bool).flatten()
        if keep.numel() != gs.count:
            raise ValueError(f"{gs.key}: keep vector has {keep.numel()} entries, the set has {gs.count} groups")
        old = self.groups.get(gs.key)
        if monotone and old is not None:
            keep = keep.to(old.device) & old
        self.groups[gs.key] = keep
        self.group_sets[gs.key] = gs

    @classmethod
    @torch.no_grad()
    def from_zeros(cls, model: nn.Module, names: Iterable[str]):
        """Element masks that keep exactly the nonzero entries of the named parameters (e.g. the weights of an
        unstructured export, so that recovery training and LoRA merges cannot revive them)."""
        params = named_parameters(model)
        out = cls()
        for name in names:
            p = params[name]
            out.set_element(name, (p.full_tensor() if is_dtensor(p) else p) != 0)
        return out

    def names(self) -> set[str]:
        out = set(self.element)
        for key in self.groups:
            out.update(m.name for m in self.group_sets[key].members)
        return out

    def __len__(self) -> int:
        return len(self.names())

    # ------------------------------------------------------------------ rows of row-sharded parameters
    def held_as_rows(self, name: str) -> bool:
        """Whether the element mask of ``name`` is held as this rank's rows only (a row-sharded parameter of the
        attached model), not at the parameter's global shape."""
        return name in self._rows

    def _cut_to_rows(self, params: dict[str, nn.Parameter]) -> None:
        """Keep only this rank's rows of the element mask of every row-sharded parameter in ``params``."""
        for name in sorted(self.element):
            p = params[name]
            rows = RowShard.of(p)
            if name not in self._rows and rows is not None:
                self.element[name] = rows.narrow(self.element[name]).to(local(p).device)
                self._rows[name] = rows

    def _whole(self, name: str) -> torch.Tensor:
        """The element mask of ``name`` at the parameter's global shape: the rows held gathered (collective)."""
        mask, rows = self.element[name], self._rows.get(name)
        return mask if rows is None else rows.gather(mask.to(torch.uint8)).to(torch.bool)

    # ------------------------------------------------------------------ factors and masks of one parameter
    def _group_factors(self, name: str, like: torch.Tensor) -> list[torch.Tensor]:
        return [
            m.factor(keep.to(like.device), like.shape)
            for key, keep in self.groups.items()
            for m in self.group_sets[key].members
            if m.name == name
        ]

    def factors(self, name: str, like: torch.Tensor) -> list[torch.Tensor]:
        """Broadcastable keep factors (bool, on ``like``'s device) whose product is the parameter's keep mask.
        Collective when the element mask is held as rows (it is gathered)."""
        out = [self._whole(name).to(like.device)] if name in self.element else []
        return out + self._group_factors(name, like)

    def _local_factors(self, name: str, p: torch.Tensor) -> list[torch.Tensor]:
        """The keep factors cut to the part of ``p`` this rank stores (its rows when ``p`` is sharded), on that
        part's device: what applying a mask in place multiplies by. No communication for a sharded ``p``."""
        if name in self._rows and is_dtensor(p):
            return [self.element[name].to(local(p).device)] + [local_part(f, p) for f in self._group_factors(name, p)]
        return [local_part(f, p) for f in self.factors(name, p)]

    def keep_mask(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The full boolean keep mask of one parameter (its global shape when ``like`` is a sharded ``DTensor``)."""
        mask = torch.ones(like.shape, dtype=torch.bool, device=like.device)
        for f in self.factors(name, like):
            mask &= f
        return mask

    def sharded_mask(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The keep mask of one parameter with the parameter's placements: a ``DTensor`` holding this rank's rows
        when ``like`` is sharded, else the full mask."""
        if name not in self._rows or not is_dtensor(like):
            return shard_like(self.keep_mask(name, like), like)
        mask = torch.ones(local(like).shape, dtype=torch.bool, device=local(like).device)
        for f in self._local_factors(name, like):
            mask &= f
        return from_local_like(mask, like)

    # ------------------------------------------------------------------ counts
    def pruned_count(self, name: str, like: torch.Tensor) -> int:
        """Entries of one parameter that the masks remove (without building the full mask when one factor does).
        Collective when the element mask is held as rows (the ranks' counts are summed)."""
        if name in self._rows and is_dtensor(like):
            mask = self.sharded_mask(name, like).to_local()
            return _sum_over(self._rows[name], int((~mask).sum()), mask.device)
        fs = self.factors(name, like)
        if not fs:
            return 0
        if len(fs) == 1:
            return int((~fs[0]).sum()) * (like.numel() // fs[0].numel())
        return int((~self.keep_mask(name, like)).sum())

    def _element_counts(self) -> tuple[int, int]:
        """``(pruned, total)`` entries of the element masks, at their global shapes. Collective when masks are held
        as rows (the ranks' pruned counts of those are summed)."""
        pruned = total = 0
        held = 0  # pruned entries of the masks held as rows, summed over the ranks below
        for k, m in self.element.items():
            if k in self._rows:
                held += int((~m).sum())
                total += self._rows[k].total * math.prod(m.shape[1:])
            else:
                pruned += int((~m).sum())
                total += m.numel()
        if self._rows:
            rows = next(iter(self._rows.values()))
            pruned += _sum_over(rows, held, self.element[next(iter(self._rows))].device)
        return pruned, total

    # ------------------------------------------------------------------ across ranks
    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> bool:
        """Rank ``src``'s masks on every rank; returns whether this rank's changed (then apply them again).

        Masks computed from identical statistics on every rank may still differ in the last bit of a tie; this makes
        them bit-equal. Element masks held as rows are skipped: they were made bit-equal when built and are not
        whole here. Collective; a no-op without a process group of more than one rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return False
        device = comm_device()
        changed = False
        for store, skip in ((self.element, self._rows), (self.groups, {})):
            for k in sorted(k for k in store if k not in skip):
                t = store[k].to(device=device, dtype=torch.uint8)
                dist.broadcast(t, src=src)
                new = t.to(store[k].device, torch.bool)
                changed |= not torch.equal(new, store[k])
                store[k] = new
        return changed

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """The masks (whole) and the group definitions."""
        return {
            # sorted: gathering the rows held is a collective every rank runs in one order
            "element": {k: self._whole(k).cpu() for k in sorted(self.element)},
            "groups": {k: v.cpu() for k, v in self.groups.items()},
            "group_sets": {
                k: {
                    "kind": gs.kind,
                    "layer": gs.layer,
                    "count": gs.count,
                    "partitions": gs.partitions,
                    "numels": list(gs.numels),
                    "members": [m.as_list() for m in gs.members],
                }
                for k, gs in self.group_sets.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.element = {k: v.to(torch.bool) for k, v in state["element"].items()}
        self._rows = {}  # whole again; cut to rows when attached to a sharded model
        self.groups = {k: v.to(torch.bool) for k, v in state["groups"].items()}
        self.group_sets = {
            k: GroupSet(
                d["kind"],
                d["layer"],
                d["count"],
                tuple(Member(*m) for m in d["members"]),
                d["partitions"],
                tuple(d["numels"]),
            )
            for k, d in state["group_sets"].items()
        }
