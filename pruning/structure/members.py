"""Groups of weights and the tensors they own: a :class:`Member` is a slice of one parameter, a :class:`GroupSet`
the coupled groups of one kind in one decoder layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

GroupKind = Literal["mlp_neuron", "attention_head", "query_head", "layer", "expert", "expert_neuron"]


@dataclass(frozen=True)
class Member:
    """One tensor of a group set: group ``g`` owns ``[offset + g*size, offset + (g+1)*size)`` along ``dim`` of
    parameter ``name``. ``offset`` > 0, or groups covering less than the whole axis, make the member a slice of a fused
    projection (Phi-3's ``gate_up_proj`` is two members, at offsets 0 and I); the rest of the axis is untouched.

    ``experts`` > 0: the parameter's dim 0 holds that many experts (a 3-D expert weight) and the groups are
    expert-major, ``g = e * (count // experts) + j`` owning slice ``j`` of expert ``e`` along ``dim``."""

    name: str
    dim: int
    size: int
    offset: int = 0
    experts: int = 0

    def _grouped(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """``tensor`` with the group axis first (``[E, per * size, ...]`` for an expert member) and cut to the
        member's slice."""
        if self.experts:
            t, axis, span = tensor.movedim(self.dim, 1), 1, count // self.experts * self.size
        else:
            t, axis, span = (tensor.movedim(self.dim, 0) if self.dim else tensor), 0, count * self.size
        if self.offset or t.shape[axis] != span:
            t = t.narrow(axis, self.offset, span)
        return t

    def per_group(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """``tensor`` (shaped like the parameter) as ``[count, size * rest]``: one row per group."""
        return self._grouped(tensor, count).reshape(count, -1)

    def aligned(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """A matrix member's ``tensor`` as ``[count, other]``: summed over each group's own rows (columns), the
        other axis kept (a view when a group is one row)."""
        t = self._grouped(tensor, count)
        if self.size == 1:
            return t.reshape(count, t.shape[-1])
        return t.reshape(count, self.size, -1).sum(1)

    def factor(self, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Broadcastable keep factor for a tensor of ``shape`` from the group keep-vector ``keep`` (kept outside
        the member's slice)."""
        lead = (self.experts,) if self.experts else ()
        vec = keep.reshape(*lead, -1).repeat_interleave(self.size, dim=-1)
        if vec.shape[-1] != shape[self.dim]:
            full = torch.ones(*lead, shape[self.dim], dtype=vec.dtype, device=vec.device)
            full[..., self.offset : self.offset + vec.shape[-1]] = vec
            vec = full
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        if self.experts:
            view[0] = self.experts
        return vec.view(view)

    def positions(self, groups: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` of the groups ``groups`` (a 1-D index tensor)."""
        if self.experts:
            raise ValueError(f"{self.name}: groups inside experts are not slices of one axis")
        groups = groups.reshape(-1)
        steps = torch.arange(self.size, device=groups.device)
        return (self.offset + groups[:, None] * self.size + steps[None, :]).flatten()

    def as_list(self) -> list:
        """``[name, dim, size]`` (and the offset and experts when there are): how masks store the member."""
        out = [self.name, self.dim, self.size]
        if self.experts:
            return out + [self.offset, self.experts]
        return out + [self.offset] if self.offset else out


@dataclass(frozen=True)
class GroupSet:
    """The ``count`` coupled groups of one kind in one decoder layer (e.g. its 8192 MLP neurons).

    ``partitions`` > 1 means groups come in that many equal consecutive partitions that must keep the same count
    each (query heads sharing KV groups: the model can only express the same number of query heads per group).
    """

    kind: GroupKind
    layer: int
    count: int
    members: tuple[Member, ...]
    partitions: int = 1
    numels: tuple[int, ...] = ()  # total element count of each member tensor

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def params_per_group(self) -> int:
        """Parameters removed with one group."""
        return sum(self.numels) // self.count
