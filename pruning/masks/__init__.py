"""Masks: how they are stored, applied and kept applied.

A :class:`MaskSet` holds *keep* masks (True = kept) by parameter name, in two forms:

- element masks, the full shape of the parameter (unstructured and N:M pruning);
- group keep-vectors, one per :class:`~pruning.structure.GroupSet` (neurons, heads, layers), stored as the
  vector and applied as a broadcastable row or column factor, so structured masks cost O(groups) memory.

Applying a mask zeroes the weights **in place**: the parameter tensors keep their storage, so optimisers, hooks and
DDP buckets keep pointing at the same memory (the rule torch.ao's ``FakeSparsity`` states for its buffer). Once
:meth:`MaskSet.attach` is called, pruned weights stay exactly zero: gradients are masked by a tensor hook, and a
global optimiser post-step hook re-zeroes the weights and the optimiser state (momentum, second moments) at pruned
positions after every step of any optimiser, so AdamW's weight decay and a momentum that predates the mask cannot
revive them. Masks are monotone (a pruned weight stays pruned) unless ``monotone=False`` is passed.

Sharded parameters (FSDP2 ``DTensor``s, sharded by rows): masks are built whole (element masks at the parameter's
global shape, group keep-vectors as they are) and applied to the rows each rank stores, in place on the local shard
(:func:`pruning.distributed.local_part`). Once attached to a sharded model, the element mask of every row-sharded
parameter is held as this rank's rows only (:class:`~pruning.distributed.RowShard`), so training holds 1/world of
them; what needs a mask whole (:meth:`MaskSet.keep_mask`, :meth:`MaskSet.factors`, the next event's monotone
selection, the checkpointed state, the lifted teacher's stash) gathers the rows, a collective every rank runs in the
same order, and counts are summed over the ranks. :meth:`MaskSet.sharded_mask` gives a mask as a ``DTensor`` with the
parameter's placements. The re-zeroing after every optimiser step works on the local shards of the weights and
of the optimiser state; gradients of sharded parameters are masked by an optimiser pre-step hook (FSDP2 writes the
reduce-scattered ``.grad`` directly, so a tensor hook on the sharded parameter never fires).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..distributed import (
    RowShard,
    comm_device,
    from_local_like,
    is_dtensor,
    local,
    local_part,
    local_rows,
    shard_like,
)
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


def _product(factors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The full keep mask from broadcastable factors, on ``like``'s device (``like``'s global shape if sharded)."""
    mask = torch.ones(like.shape, dtype=torch.bool, device=like.device)
    for f in factors:
        mask &= f.to(like.device)
    return mask


def _group_factor(member: Member, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcastable keep factor for one member tensor from a group keep-vector."""
    vec = keep.repeat_interleave(member.size)
    view = [1] * len(shape)
    view[member.dim] = shape[member.dim]
    return vec.view(view)


def _sum_over(rows: RowShard, count: int, device: torch.device) -> int:
    """``count`` summed over the ranks of ``rows``' group (collective)."""
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=rows.group)
    return int(t.item())


@dataclass
class Counts:
    pruned: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.pruned / self.total if self.total else 0.0

    def add(self, pruned: int, total: int) -> None:
        self.pruned += pruned
        self.total += total

    def as_dict(self) -> dict:
        return {"pruned": self.pruned, "total": self.total, "fraction": self.fraction}


@dataclass
class SparsityReport:
    """Pruned counts per tensor, per decoder layer, per granularity, of the targeted weights and of the model.

    ``targeted`` counts the weights the pruning was asked to consider; ``model`` counts all parameters (the
    definition SDMPrune uses when it says "20 % pruned"). Granularity counts are *groups* (neurons, heads, layers);
    ``element`` counts weights masked element-wise.
    """

    tensors: dict[str, Counts] = field(default_factory=dict)
    layers: dict[int, Counts] = field(default_factory=dict)
    granularity: dict[str, Counts] = field(default_factory=dict)
    targeted: Counts = field(default_factory=Counts)
    model: Counts = field(default_factory=Counts)

    def as_dict(self) -> dict:
        return {
            "tensors": {k: v.as_dict() for k, v in self.tensors.items()},
            "layers": {k: v.as_dict() for k, v in self.layers.items()},
            "granularity": {k: v.as_dict() for k, v in self.granularity.items()},
            "targeted": self.targeted.as_dict(),
            "model": self.model.as_dict(),
        }

    def format(self) -> str:
        lines = ["| scope | pruned | total | fraction |", "|---|---:|---:|---:|"]
        for k, c in self.granularity.items():
            lines.append(f"| {k} (groups) | {c.pruned} | {c.total} | {c.fraction:.4f} |")
        for i, c in sorted(self.layers.items()):
            lines.append(f"| layer {i} | {c.pruned} | {c.total} | {c.fraction:.4f} |")
        lines.append(
            f"| targeted weights | {self.targeted.pruned} | {self.targeted.total} | {self.targeted.fraction:.4f} |"
        )
        lines.append(f"| all parameters | {self.model.pruned} | {self.model.total} | {self.model.fraction:.4f} |")
        return "\n".join(lines)


class MaskSet:
    """Keep masks for a model's parameters, applied in place and kept applied. See the module docstring."""

    def __init__(self) -> None:
        self.element: dict[str, torch.Tensor] = {}
        self.groups: dict[str, torch.Tensor] = {}
        self.group_sets: dict[str, GroupSet] = {}
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []
        self._by_id: dict[int, str] = {}
        self._params: dict[str, nn.Parameter] = {}
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

    def names(self) -> set[str]:
        out = set(self.element)
        for key in self.groups:
            out.update(m.name for m in self.group_sets[key].members)
        return out

    def held_as_rows(self, name: str) -> bool:
        """Whether the element mask of ``name`` is held as this rank's rows only (a row-sharded parameter of the
        attached model), not at the parameter's global shape."""
        return name in self._rows

    def reset_to(self, element: dict[str, torch.Tensor]) -> None:
        """Replace every mask by the whole element masks ``element`` (the masks of a model after surgery): no group
        masks, no stash of original values, no parameter bindings (attach again to hold them)."""
        self.element = dict(element)
        self.groups, self.group_sets, self._stash = {}, {}, {}
        self._params, self._by_id, self._rows = {}, {}, {}

    def _whole(self, name: str) -> torch.Tensor:
        """The element mask of ``name`` at the parameter's global shape: the rows held gathered (collective)."""
        mask, rows = self.element[name], self._rows.get(name)
        return mask if rows is None else rows.gather(mask.to(torch.uint8)).to(torch.bool)

    def _group_factors(self, name: str, like: torch.Tensor) -> list[torch.Tensor]:
        return [
            _group_factor(m, keep.to(like.device), like.shape)
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

    def __len__(self) -> int:
        return len(self.names())

    # ------------------------------------------------------------------ applying
    def resolve(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters of ``model`` the masks name, by name (sorted); ``KeyError`` if one is missing."""
        params = named_parameters(model)
        missing = [n for n in self.names() if n not in params]
        if missing:
            raise KeyError(f"masks name parameters the model does not have: {missing[:5]}")
        # sorted: applying to sharded parameters gathers some (the stash), a collective every rank runs in one order
        return {n: params[n] for n in sorted(self.names())}

    _resolve = resolve  # the former private name, for callers not yet switched to resolve()

    @torch.no_grad()
    def apply(self, model: nn.Module, keep_original: bool = False, only: Iterable[str] | None = None) -> None:
        """Zero the pruned weights in place (of the parameters named in ``only``, default all). With
        ``keep_original`` the values being zeroed are stashed (on CPU) so that :meth:`lifted` can run the original
        model with the same parameters (the distillation teacher)."""
        params = self.resolve(model)
        if only is not None:
            only = set(only)
            params = {n: p for n, p in params.items() if n in only}
        for name, p in params.items():
            if keep_original:
                full = p.full_tensor() if is_dtensor(p) else p.detach().clone()
                if name in self._stash:
                    old_factors, old_vals = self._stash[name]
                    full[~_product(old_factors, full)] = old_vals.to(full.device, full.dtype)
                # the mask is kept as its compact factors (a group keep-vector costs O(groups)), the values as the
                # pruned entries only, on the host: the stash is the pruned fraction of the weights, no more
                fs = self.factors(name, p)
                self._stash[name] = ([f.cpu() for f in fs], full[~_product(fs, full)].cpu())
            for f in self._local_factors(name, p):
                local(p).mul_(f)
        if self.attached:
            self._params = self.resolve(model)

    @torch.no_grad()
    def reapply(self) -> None:
        """Re-zero pruned weights of the attached model (after a LoRA merge, a load, a foreign optimiser)."""
        for name, p in self._params.items():
            for f in self._local_factors(name, p):
                local(p).mul_(f)

    @contextmanager
    def lifted(self, model: nn.Module) -> Iterator[None]:
        """Temporarily restore the original values of pruned weights (those stashed by ``apply(keep_original=True)``).

        The frozen teacher of self-distillation is then the same parameters with the masks lifted: no second copy
        of the model is held on the device, only the pruned values are brought back for the teacher's forward.
        """
        params = named_parameters(model)
        with torch.no_grad():
            for name, (factors, vals) in self._stash.items():
                p = params[name]
                pruned = ~_product(factors, p)
                if is_dtensor(p):  # the stash is in row-major order: this rank's rows are one contiguous slice
                    first, rows = local_rows(p)
                    start = int(pruned[:first].sum())
                    pruned = pruned[first : first + rows]
                    vals = vals[start : start + int(pruned.sum())]
                lp = local(p)
                lp[pruned.to(lp.device)] = vals.to(lp.device, lp.dtype)
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self._stash:
                    p = params[name]
                    for f in self._local_factors(name, p):
                        local(p).mul_(f)

    @property
    def has_original(self) -> bool:
        return bool(self._stash)

    def stash_bytes(self) -> int:
        """Host memory the stash of original values holds (the pruned values and their compact mask factors)."""
        return sum(
            vals.numel() * vals.element_size() + sum(f.numel() * f.element_size() for f in factors)
            for factors, vals in self._stash.values()
        )

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` holds the masks on a model (gradient and optimiser hooks in place)."""
        return bool(self._handles)

    def attach(self, model: nn.Module) -> MaskSet:
        """Keep the masks applied through training: mask gradients and re-zero after every optimiser step."""
        self.detach()
        self.apply(model)
        self._params = self.resolve(model)
        self._hold_rows()
        self._by_id = {id(p): n for n, p in self._params.items()}
        sharded = False
        for name, p in self._params.items():
            if is_dtensor(p):
                sharded = True  # FSDP2: the sharded parameter is not in the graph; see _before_step
            elif p.requires_grad:
                self._handles.append(p.register_hook(self._grad_hook(name)))
        ref = weakref.ref(self)

        def post_step(optimizer, args, kwargs):
            masks = ref()
            if masks is not None:
                masks._after_step(optimizer)

        self._handles.append(register_optimizer_step_post_hook(post_step))
        if sharded:

            def pre_step(optimizer, args, kwargs):
                masks = ref()
                if masks is not None:
                    masks._before_step(optimizer)

            self._handles.append(register_optimizer_step_pre_hook(pre_step))
        return self

    def _hold_rows(self) -> None:
        """Keep only this rank's rows of the element mask of every row-sharded parameter of the attached model."""
        for name in sorted(self.element):
            p = self._params[name]
            rows = RowShard.of(p)
            if name not in self._rows and rows is not None:
                self.element[name] = rows.narrow(self.element[name]).to(local(p).device)
                self._rows[name] = rows

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _grad_hook(self, name: str):
        ref = weakref.ref(self)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            masks = ref()
            if masks is None:
                return grad
            for f in masks.factors(name, grad):
                grad = grad * f
            return grad

        return hook

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Mask the (reduce-scattered) gradients of sharded parameters on their local shards."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = self._by_id.get(id(p))
                if name is None or p.grad is None or not is_dtensor(p):
                    continue
                for f in self._local_factors(name, p):
                    local(p.grad).mul_(f)

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = self._by_id.get(id(p))
                if name is None:
                    continue
                state = optimizer.state.get(p, {})
                for f in self._local_factors(name, p):
                    local(p).mul_(f)
                    for v in state.values():
                        if torch.is_tensor(v) and v.shape == p.shape:
                            local(v).mul_(f)

    @classmethod
    @torch.no_grad()
    def from_zeros(cls, model: nn.Module, names: Iterable[str]) -> MaskSet:
        """Element masks that keep exactly the nonzero entries of the named parameters (e.g. the weights of an
        unstructured export, so that recovery training and LoRA merges cannot revive them)."""
        params = named_parameters(model)
        out = cls()
        for name in names:
            p = params[name]
            out.set_element(name, (p.full_tensor() if is_dtensor(p) else p) != 0)
        return out

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
    def state_dict(self, with_original: bool = False) -> dict:
        """Masks and group definitions; ``with_original`` adds the stashed original values of pruned weights (what
        the lifted teacher needs after a resume: the checkpointed weights are already zero there)."""
        out = self._state()
        if with_original and self._stash:
            out["original"] = {k: ([f.clone() for f in fs], vals.clone()) for k, (fs, vals) in self._stash.items()}
        return out

    def _state(self) -> dict:
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
                    "members": [[m.name, m.dim, m.size] for m in gs.members],
                }
                for k, gs in self.group_sets.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if "original" in state:
            self._stash = {k: ([f.to(torch.bool) for f in fs], vals) for k, (fs, vals) in state["original"].items()}
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

    # ------------------------------------------------------------------ reporting
    def report(self, model: nn.Module, targets: Iterable[str] | None = None) -> SparsityReport:
        """Sparsity of the masks (entries masked out, not natural zeros). ``targets``: the parameter names the
        pruning considered (default: the masked parameters)."""
        from ..structure import ModelStructure, UnsupportedModelError

        try:
            structure: ModelStructure | None = ModelStructure(model)
        except (UnsupportedModelError, AttributeError):
            structure = None
        target_names = set(targets) if targets is not None else set()
        target_names |= self.names()
        rep = SparsityReport()
        masked = self.names()
        for name, p in model.named_parameters():
            name = name.replace(".base_layer.", ".")  # PEFT-wrapped weights report under their own names
            pruned = 0
            if name in masked:
                pruned = self.pruned_count(name, p)
            rep.model.add(pruned, p.numel())
            if name in target_names:
                rep.targeted.add(pruned, p.numel())
                rep.tensors[name] = Counts(pruned, p.numel())
                layer = structure.layer_of(name) if structure else None
                if layer is not None:
                    rep.layers.setdefault(layer, Counts()).add(pruned, p.numel())
        if self.element:
            c = rep.granularity.setdefault("element", Counts())
            held = 0  # pruned entries of the masks held as rows, summed over the ranks below
            for k, m in self.element.items():
                if k in self._rows:
                    held += int((~m).sum())
                    c.add(0, self._rows[k].total * math.prod(m.shape[1:]))
                else:
                    c.add(int((~m).sum()), m.numel())
            if self._rows:
                rows = next(iter(self._rows.values()))
                c.add(_sum_over(rows, held, self.element[next(iter(self._rows))].device), 0)
        for key, keep in self.groups.items():
            kind = self.group_sets[key].kind
            rep.granularity.setdefault(kind, Counts()).add(int((~keep).sum()), keep.numel())
        return rep
