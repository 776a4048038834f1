"""Group statistics of one batch from per-sequence gradients (for :mod:`.sequences`): a group set's per-sequence
partial sums stay open until the last of its members' gradients arrives (one decoder layer's, in the same backward),
then go into its statistics.

- ``vector`` (``Σ_n |Σ_group g_n⊙w|``) is linear in the members: a ``[sequences, groups]`` partial sum;
- ``coupled`` (``Σ_n mean_j |Σ_members g_n⊙w [group, j]|``) sums the members aligned on the hidden axis before the
  absolute value: a ``[sequences, groups, hidden]`` partial sum, the size of one member per sequence.

Also the per-sequence products both modules use: a Linear's per-sequence weight gradients ``δ_nᵀ x_n`` and bias
gradients, and sums over each group's part of a member.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..structure import Member
from .gradients import GradientStats, GroupGradientStats

Mask = torch.Tensor | None  # [sequences, positions, 1], 0 at padding; None: no padding


@dataclass
class Role:
    """How one Linear's parameters enter a group set: the members its weight and its bias are (none: not one; several
    when the Linear is fused, each a slice of it)."""

    weights: tuple[Member, ...] = ()
    biases: tuple[Member, ...] = ()


class GroupPlan:
    """A group set's statistics and the role of each Linear (by module name) in it."""

    def __init__(self, stats: GroupGradientStats) -> None:
        self.stats = stats
        self.key = stats.group_set.key
        self.count = stats.group_set.count
        self.coupled = "coupled" in stats.kinds
        self.vector = "vector" in stats.kinds
        self.roles: dict[str, Role] = {}
        for m in stats.group_set.members:
            owner, _, attr = m.name.rpartition(".")
            role = self.roles.setdefault(owner, Role())
            if attr == "weight":
                role.weights += (m,)
            else:
                role.biases += (m,)

    def transposed(self, module: str) -> bool:
        """Whether the module's per-sequence gradients are made transposed (``x_nᵀ δ_n``, ``[in, out]``): a column
        member (down_proj, o_proj) of a coupled set, so that its aligned ``g⊙w`` is contiguous like the rows'."""
        role = self.roles.get(module)
        return self.coupled and role is not None and any(m.dim == 1 for m in role.weights)


class OpenGroup:
    """A group set's per-sequence partial sums over the batch in flight, until its last member arrives (or the
    batch ends)."""

    def __init__(self, plan: GroupPlan, sequences: int, device: torch.device) -> None:
        self.plan = plan
        self.sequences = sequences
        self.arrived: set[str] = set()
        self.vector = torch.zeros(sequences, plan.count, device=device) if plan.vector else None  # Σ_group g_n⊙w
        self.coupled: torch.Tensor | None = None  # [sequences, groups, hidden]: Σ_members aligned g_n⊙w
        self._first: Member | None = None  # the member whose parts started the coupled sums

    @property
    def complete(self) -> bool:
        return len(self.arrived) == len(self.plan.roles)

    @torch.no_grad()
    def add_weight(self, lo: int, gw: torch.Tensor, role: Role) -> None:
        """A chunk of sequences ``[lo, lo + len(gw))`` of one member weight's ``g_n⊙w`` (``[n, out, in]``, or
        ``[n, in, out]`` when :meth:`GroupPlan.transposed`); ``gw``'s buffer may be reused."""
        for m in role.weights:
            self._add_member(lo, gw, m)

    def _add_member(self, lo: int, gw: torch.Tensor, m: Member) -> None:
        hi, count, size = lo + len(gw), self.plan.count, m.size
        if not self.plan.coupled:
            self.vector[lo:hi] += group_totals(gw, m, count)
            return
        own = gw if not m.offset and gw.shape[1] == count * size else gw.narrow(1, m.offset, count * size)
        part = own if size == 1 else own.reshape(len(gw), count, size, -1).sum(2)  # over the group's own rows
        if self.coupled is None:  # the first member writes its parts, the others add theirs
            self.coupled = torch.empty((self.sequences, *part.shape[1:]), dtype=torch.float32, device=part.device)
            self._first = m
        if self.coupled.shape[1:] != part.shape[1:]:
            raise ValueError(
                f"'coupled' statistics need members aligned on one axis; {m.name} gives "
                f"{tuple(part.shape[1:])}, the others {tuple(self.coupled.shape[1:])} (use 'vector' for "
                f"{self.plan.key})"
            )
        if m == self._first:
            self.coupled[lo:hi].copy_(part)
        else:
            self.coupled[lo:hi] += part

    def add_bias(self, gb: torch.Tensor, bias: torch.Tensor, role: Role) -> None:
        """Every sequence's bias gradient ``gb`` ``[n, out]`` times the bias, into the ``vector`` partial sums (the
        coupled sum leaves biases out)."""
        for m in role.biases if self.vector is not None else ():
            self.vector += group_totals(gb * bias.float(), m, self.plan.count)

    @torch.no_grad()
    def finish(self, factors: list[float]) -> None:
        """The batch's sums into the group statistics (``factors``: one per sequence, ≥ 0, so that
        ``|factor · s| = factor · |s|``)."""
        f = torch.tensor(factors, dtype=torch.float32)
        sums = {}
        if self.plan.coupled:
            sums["coupled"] = torch.zeros(self.plan.count)
            if self.coupled is not None:  # mean_j |s[n, group, j]|, weighted by the factors, summed over n
                f = f.to(self.coupled.device)
                means = torch.linalg.vector_norm(self.coupled, ord=1, dim=2).div_(self.coupled.shape[2])
                sums["coupled"] = means.mul_(f[:, None]).sum(0)
        if self.vector is not None:
            vector = self.vector if self.coupled is None else self.vector + self.coupled.sum(2)
            sums["vector"] = (vector.abs() * f.to(vector.device)[:, None]).sum(0)
        self.plan.stats.add_sums(sums, self.sequences)


# ---------------------------------------------------------------------------------------------- the products
def sequence_products(x3: torch.Tensor, d3: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Per-sequence weight gradients ``δ_nᵀ x_n``, ``[n, out, in]`` (``transposed``: ``[n, in, out]``), in fp32,
    from ``x3`` ``[n, positions, in]`` and ``d3`` ``[n, positions, out]``."""
    g = torch.bmm(x3.transpose(1, 2), d3) if transposed else torch.bmm(d3.transpose(1, 2), x3)
    return g.float()


def bias_sequences(d3: torch.Tensor, m3: Mask) -> torch.Tensor:
    """Per-sequence bias gradients ``[n, out]`` in fp32 (padding left out)."""
    d = d3 if m3 is None else d3 * m3
    return d.float().sum(1)


def group_totals(t: torch.Tensor, member: Member, count: int) -> torch.Tensor:
    """``[n, groups]``: each sequence's ``t`` (``[n, *member shape]``) summed over each group's part of ``member``."""
    if member.dim:  # a weight's columns: over its rows first
        t = t.sum(1)
    if member.offset or t.shape[1] != count * member.size:
        t = t.narrow(1, member.offset, count * member.size)
    return t.reshape(t.shape[0], count, -1).sum(2)


def fold_bias(stat: GradientStats | None, gb: torch.Tensor, b: torch.Tensor, factors: list[float]) -> None:
    """Per-sequence bias gradients ``gb`` ``[n, out]`` into the bias's element statistics ``stat``, if any."""
    if stat is None:
        return
    dest = stat.open_batch(b.shape, b.device)
    for i, g in enumerate(gb):
        stat.add_sequence(dest, g, b, factors[i])
    stat.close_batch(dest, len(gb))
