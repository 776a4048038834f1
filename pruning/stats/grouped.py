"""Group statistics of one batch from per-sequence gradients (for :mod:`.sequences`): a group set's sums stay open
until the last of its members' gradients arrives, and the ``coupled`` sum is taken one sequence at a time.

Also the per-sequence products both modules use: a Linear's per-sequence weight gradients (``δ_nᵀ x_n``) and bias
gradients, and sums over each group's part of a member.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..structure import Member
from .gradients import GradientStats, GroupGradientStats

Mask = torch.Tensor | None  # [sequences, positions, 1], 0 at padding; None: no padding


@dataclass
class Role:
    """How one Linear's parameters enter a group set: the members its weight and its bias are (``None``: not one)."""

    weight: Member | None = None
    bias: Member | None = None


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
            setattr(self.roles.setdefault(owner, Role()), attr, m)


@dataclass
class Held:
    """What a member Linear of a coupled group set leaves for the set's flush: its input and output gradient as
    ``[sequences, positions, features]`` (the input zeroed at padding), the padding mask, its parameters and its
    parameters' element statistics ("weight" / "bias")."""

    x3: torch.Tensor
    d3: torch.Tensor
    m3: Mask
    weight: torch.Tensor
    bias: torch.Tensor | None
    element: dict[str, GradientStats] = field(default_factory=dict)


class OpenGroup:
    """A group set's sums over the batch in flight, until its last member arrives (or the batch ends)."""

    def __init__(self, plan: GroupPlan, sequences: int, device: torch.device) -> None:
        self.plan = plan
        self.sequences = sequences
        self.arrived: set[str] = set()
        self.held: dict[str, Held] = {}  # coupled: module name -> what it left
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
        self.vector = zeros(sequences, plan.count) if plan.vector else None  # Σ_group g_n⊙w per sequence, unscaled
        self.coupled = zeros(plan.count) if plan.coupled else None  # Σ_n factor_n · mean_j |coupled sum|

    @property
    def complete(self) -> bool:
        return len(self.arrived) == len(self.plan.roles)

    @torch.no_grad()
    def finish(self, factors: list[float], chunk_elements: int) -> None:
        """The batch's sums into the group statistics (``factors``: one per sequence)."""
        if self.held:
            self._flush(factors, chunk_elements)
        sums = {}
        if self.coupled is not None:
            sums["coupled"] = self.coupled
        if self.vector is not None:
            f = torch.tensor(factors, device=self.vector.device)
            sums["vector"] = (self.vector.abs() * f[:, None]).sum(0)
        self.plan.stats.add_sums(sums, self.sequences)

    def _flush(self, factors: list[float], chunk_elements: int) -> None:
        """Every held member's ``g_n``, a chunk of sequences at a time; per sequence the coupled sum over the
        members (aligned on the hidden axis), its mean absolute value per group, the ``vector`` partial sums and
        the members' element statistics."""
        plan, n = self.plan, self.sequences
        layout = [_Layout(name, h, plan.roles[name]) for name, h in self.held.items()]
        dests = [lay.open() for lay in layout]
        step = max(1, min(n, chunk_elements // sum(h.weight.numel() for h in self.held.values())))
        for lo in range(0, n, step):
            grads = [
                sequence_products(lay.held.x3[lo : lo + step], lay.held.d3[lo : lo + step], lay.columns)
                for lay in layout
            ]
            for i in range(len(grads[0])):
                total = None
                for lay, dest, g in zip(layout, dests, grads):
                    part = lay.fold(dest, g[i], factors[lo + i], plan.count)
                    if total is not None and total.shape != part.shape:
                        raise ValueError(
                            f"'coupled' statistics need members aligned on one axis; {lay.name} gives "
                            f"{tuple(part.shape)}, the others {tuple(total.shape)} (use 'vector' for {plan.key})"
                        )
                    total = part if total is None else total.add_(part)
                self.coupled.add_(total.abs().mean(1), alpha=factors[lo + i])
                if self.vector is not None:
                    self.vector[lo + i] += total.sum(1)
        for lay, dest in zip(layout, dests):
            lay.close(dest, factors, self.vector, plan.count)
        self.held = {}


class _Layout:
    """One held member of a coupled set, computed in the layout the coupled sum is taken in: rows as they are, a
    column member (down_proj, o_proj) transposed (``x_nᵀ δ_n``), so that every sum runs over contiguous memory."""

    def __init__(self, name: str, held: Held, role: Role) -> None:
        self.name, self.held, self.role = name, held, role
        self.columns = role.weight.dim == 1
        w = held.weight.float()
        self.weight = (w.t() if self.columns else w).contiguous()
        self.stat = held.element.get("weight")

    def open(self) -> dict | None:
        return self.stat.open_batch(self.held.weight.shape, self.held.weight.device) if self.stat else None

    def fold(self, dest: dict | None, g: torch.Tensor, factor: float, count: int) -> torch.Tensor:
        """One sequence's element terms; returns its ``g⊙w`` summed over each group's own rows, ``[groups, hidden]``
        (made in ``g``'s buffer)."""
        if dest is not None:
            self.stat.add_sequence(dest, g.t() if self.columns else g, self.held.weight, factor)
        gw = g.mul_(self.weight)
        size = self.role.weight.size
        return gw if size == 1 else gw.reshape(count, size, -1).sum(1)

    def close(self, dest: dict | None, factors: list[float], vector: torch.Tensor | None, count: int) -> None:
        """The batch's element sums counted; the bias's per-sequence terms (element and ``vector``)."""
        if dest is not None:
            self.stat.close_batch(dest, len(factors))
        h = self.held
        in_vector = vector is not None and self.role.bias is not None
        if h.bias is None or not ("bias" in h.element or in_vector):
            return
        gb = bias_sequences(h.d3, h.m3)
        fold_bias(h.element.get("bias"), gb, h.bias, factors)
        if in_vector:
            vector += group_totals(gb * h.bias.float(), 0, count)


# ---------------------------------------------------------------------------------------------- the products
def sequence_products(x3: torch.Tensor, d3: torch.Tensor, columns: bool = False) -> torch.Tensor:
    """Per-sequence weight gradients ``δ_nᵀ x_n``, ``[n, out, in]`` (``columns``: transposed, ``[n, in, out]``), in
    fp32, from ``x3`` ``[n, positions, in]`` and ``d3`` ``[n, positions, out]``."""
    g = torch.bmm(x3.transpose(1, 2), d3) if columns else torch.bmm(d3.transpose(1, 2), x3)
    return g.float()


def bias_sequences(d3: torch.Tensor, m3: Mask) -> torch.Tensor:
    """Per-sequence bias gradients ``[n, out]`` in fp32 (padding left out)."""
    d = d3 if m3 is None else d3 * m3
    return d.float().sum(1)


def group_totals(t: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    """``[n, groups]``: each sequence's ``t`` (``[n, *member shape]``) summed over each group's part along ``dim``."""
    if dim:  # a weight's columns: over its rows first
        t = t.sum(1)
    return t.reshape(t.shape[0], count, -1).sum(2)


def fold_bias(stat: GradientStats | None, gb: torch.Tensor, b: torch.Tensor, factors: list[float]) -> None:
    """Per-sequence bias gradients ``gb`` ``[n, out]`` into the bias's element statistics ``stat``, if any."""
    if stat is None:
        return
    dest = stat.open_batch(b.shape, b.device)
    for i, g in enumerate(gb):
        stat.add_sequence(dest, g, b, factors[i])
    stat.close_batch(dest, len(gb))
