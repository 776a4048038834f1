"""Groups of weights and the tensors they own: a :class:`Member` is a slice of one parameter, a :class:`GroupSet`
the coupled groups of one kind in one decoder layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

GroupKind = Literal["mlp_neuron", "attention_head", "query_head", "layer"]


@dataclass(frozen=True)
class Member:
    """One tensor of a group set: group ``g`` owns ``[offset + g*size, offset + (g+1)*size)`` along ``dim`` of
    parameter ``name``. ``offset`` > 0, or groups covering less than the whole axis, make the member a slice of a fused
    projection (Phi-3's ``gate_up_proj`` is two members, at offsets 0 and I); the rest of the axis is untouched."""

    name: str
    dim: int
    size: int
    offset: int = 0

    def per_group(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """``tensor`` (shaped like the parameter) as ``[count, size * rest]``: one row per group."""
        t = tensor.movedim(self.dim, 0) if self.dim else tensor
        if self.offset or t.shape[0] != count * self.size:
            t = t.narrow(0, self.offset, count * self.size)
        return t.reshape(count, -1)

    def aligned(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """A 2-D member's ``tensor`` as ``[count, other]``: summed over each group's own rows (columns), the other
        axis kept (a view when a group is one row)."""
        t = tensor.movedim(self.dim, 0) if self.dim else tensor
        if self.offset or t.shape[0] != count * self.size:
            t = t.narrow(0, self.offset, count * self.size)
        return t if self.size == 1 else t.reshape(count, -1, t.shape[-1]).sum(1)

    def factor(self, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Broadcastable keep factor for a tensor of ``shape`` from the group keep-vector ``keep`` (kept outside
        the member's slice)."""
        vec = keep.repeat_interleave(self.size)
        if vec.numel() != shape[self.dim]:
            full = torch.ones(shape[self.dim], dtype=vec.dtype, device=vec.device)
            full[self.offset : self.offset + vec.numel()] = vec
            vec = full
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        return vec.view(view)

    def positions(self, groups: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` of the groups ``groups`` (a 1-D index tensor)."""
        groups = groups.reshape(-1)
        steps = torch.arange(self.size, device=groups.device)
        return (self.offset + groups[:, None] * self.size + steps[None, :]).flatten()

    def as_list(self) -> list:
        """``[name, dim, size]`` (and the offset when there is one): how masks store the member."""
        out = [self.name, self.dim, self.size]
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
