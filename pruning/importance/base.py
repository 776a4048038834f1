"""The criterion interface: statistics in, scores out. One criterion per file, registered by name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from ..stats import ActivationStats, GradientCollector, GradientStats, GroupGradientStats
from ..structure import GroupSet, Member

CRITERIA: dict[str, type[Criterion]] = {}
NM = tuple[int, int] | None  # an N:M pattern, or none
Keep = torch.Tensor | None  # a keep mask already there (monotone pruning), or none
Pruned = tuple[torch.Tensor, torch.Tensor, dict]  # (keep mask, new weight, info) of a reconstructing criterion


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name``."""
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str, **options) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"method={name!r} is not a known criterion; choose from {sorted(CRITERIA)}")
    cls = CRITERIA[name]
    fields = set(cls.__dataclass_fields__)
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; it takes {sorted(fields) or 'none'}")
    return cls(**options)


@dataclass
class ScoreContext:
    """What a criterion may read: weights, activation statistics by module name, gradient statistics by parameter
    name, group statistics by group-set key, and (where known) the count each group set keeps."""

    weights: dict[str, torch.Tensor]
    act: dict[str, ActivationStats] = field(default_factory=dict)
    grad: dict[str, GradientStats] = field(default_factory=dict)
    group: dict[str, GroupGradientStats] = field(default_factory=dict)
    # groups each group set keeps at this event, by key, where the selection fixes the count before scoring (read by
    # a criterion whose own procedure stops at the target: mutual information's random pairs)
    keep: dict[str, int] = field(default_factory=dict)

    def act_norm(self, weight_name: str) -> torch.Tensor:
        """‖X_j‖₂ over calibration tokens for the Linear owning ``weight_name``."""
        module = weight_name.rsplit(".", 1)[0]
        if module not in self.act:
            raise KeyError(f"no activation statistics for {module}")
        return self.act[module].sums["sum_sq"].sqrt()

    def grad_count(self, weight_name: str) -> int:
        """How many per-sample gradients the statistics of ``weight_name`` hold."""
        if weight_name not in self.grad:
            raise KeyError(f"no gradient statistics for {weight_name}")
        return int(self.grad[weight_name].count)

    def grad_stat(self, weight_name: str, kind: str) -> torch.Tensor:
        if weight_name not in self.grad or kind not in self.grad[weight_name].sums:
            raise KeyError(f"no gradient statistic {kind!r} for {weight_name}")
        if self.grad[weight_name].on_rows:
            raise RuntimeError(
                f"the gradient statistics of {weight_name} are held on this rank's rows (reduced with lazy=True). "
                "HINT: read them inside GradientCollector.whole([...])"
            )
        return self.grad[weight_name].sums[kind]


def sum_per_group(gs: GroupSet, parts: Iterable[tuple[Member, torch.Tensor]]) -> torch.Tensor:
    """``[gs.count]`` fp32: each ``(member, tensor)`` (the tensor shaped like the member's parameter) summed over
    every group's slice, added over the parts. Give a generator to hold one member's tensor at a time."""
    total = torch.zeros(gs.count, dtype=torch.float32)
    for m, t in parts:
        t = t.float()
        t = m.per_group(t, gs.count).sum(1)
        total = total.to(t.device) + t
    return total


def matrix_members(gs: GroupSet, ctx: ScoreContext) -> list[Member]:
    """The matrix members of ``gs``, 3-D expert weights included (biases carry no activation or gradient context
    and are left out of scores)."""
    return [m for m in gs.members if ctx.weights[m.name].dim() >= 2]


def column_members(gs: GroupSet, ctx: ScoreContext) -> list[Member]:
    """The 2-D members whose *columns* are the groups (down_proj / fc2 for MLP neurons, o_proj for heads and KV
    groups): the projection that reads the group's outputs. Empty for whole layers."""
    return [m for m in matrix_members(gs, ctx) if m.dim == 1]


class BatchLearner(Protocol):
    """Criterion options learned from the batches of a scoring window (:meth:`Criterion.batch_learner`)."""

    def close_batch(self, gradients: GradientCollector) -> bool: ...
    def reduce(self, group=None) -> None: ...
    def learned(self) -> dict: ...
    def reset(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def merged_state_dict(self, group=None) -> dict: ...
    def load_merged_state_dict(self, state: dict, rank: int) -> None: ...


@dataclass
class Criterion:
    """Turns statistics into scores; higher = more important = kept.

    Subclasses implement :meth:`element_scores` (one score per weight, for unstructured, N:M and the default
    group aggregation) and may override :meth:`group_scores`. The default group score is the sum of the element
    scores of the group's 2-D members (biases carry no activation or gradient context and are left out).
    """

    name: ClassVar[str]
    needs_activations: ClassVar[bool] = False
    # activation statistics besides Σx² (see ActivationStats: "gram" for SparseGPT, "samples" for mutual information)
    act_kinds: ClassVar[tuple[str, ...]] = ("sum_sq",)
    # True when the criterion also rewrites the weights it keeps (SparseGPT): pruning then goes through prune_weight
    reconstructs: ClassVar[bool] = False
    # False when scores of different layers cannot be compared (per-layer ranks, per-layer reconstruction): then
    # allocation='global' and scope='global' are refused
    global_ranking: ClassVar[bool] = True
    # the unstructured comparison group when the options name none (SelectionOptions.scope): "row" (Wanda's: every
    # row loses the same share), or "layer" (SparseGPT's: one threshold over each column block's rows)
    default_scope: ClassVar[str] = "row"
    grad_kinds: ClassVar[tuple[str, ...]] = ()
    group_kinds: ClassVar[tuple[str, ...]] = ()
    # True when the gradients it reads may come from a distillation loss against the unpruned model (SDMPrune's
    # KL+CE): then pruning.prune accepts alpha / temperature for it
    distills: ClassVar[bool] = False
    # granularity kinds it scores (Granularity.kind: "n:m" stands for every N:M pattern)
    granularities: ClassVar[tuple[str, ...]] = (
        "unstructured",
        "n:m",
        "mlp_neuron",
        "attention_head",
        "query_head",
        "layer",
    )

    @property
    def needs_gradients(self) -> bool:
        return bool(self.grad_kinds or self.group_kinds)

    def group_statistics(self, granularity: str) -> tuple[str, ...]:
        """The group gradient statistics it reads to score groups of ``granularity`` (default: ``group_kinds``)."""
        return self.group_kinds

    def collector_options(self) -> dict:
        """Keyword arguments for the :class:`~pruning.stats.ActivationCollector` that gathers this criterion's
        activation statistics (``kinds``, and for ``samples`` their number and seed)."""
        return {"kinds": self.act_kinds}

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError

    def prune_weight(
        self, name: str, ctx: ScoreContext, sparsity: float, nm: NM, scope: str, prev_keep: Keep
    ) -> Pruned:
        """For ``reconstructs`` criteria: ``(keep mask, new weight, info)`` of one weight at ``sparsity`` (or N:M)."""
        raise NotImplementedError(f"{self.name} selects by scores; it does not reconstruct weights")

    def min_keep_count(self, gs: GroupSet) -> int:
        """Groups of ``gs`` that must stay whatever the sparsity (after :meth:`group_scores` ran on it); a criterion
        with its own stopping rule (mutual information's threshold) raises it. Default 0."""
        return 0

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        return self.summed_scores(gs, ctx, matrix_members(gs, ctx))

    def summed_scores(self, gs: GroupSet, ctx: ScoreContext, members: Iterable[Member]) -> torch.Tensor:
        """Per group of ``gs``: the sum of the element scores of ``members``, one member's scores held at a time."""
        return sum_per_group(gs, ((m, self.element_scores(m.name, ctx)) for m in members))

    def batch_learner(self, group_sets: list[GroupSet]) -> BatchLearner | None:
        """What this criterion learns batch by batch from a training run's scoring window (SAAP's σ), or ``None``
        (default): the callbacks close a batch after every optimiser step and pass the criterion options it learned
        to the event."""
        return None

    def group_densities(self, sets: list[GroupSet], ctx: ScoreContext) -> list[torch.Tensor]:
        """Importance per parameter of the groups of ``sets`` (group sets of different kinds compared in one
        parameter budget, ``mlp_neuron+attention_head``), comparable across the sets. Default: the group score over
        the group's parameter count, right for scores that add up over a group's weights; a criterion that
        normalises its scores says how they compare across kinds (SAAP)."""
        return [self.group_scores(gs, ctx).float() / gs.params_per_group for gs in sets]

    def check_granularity(self, granularity: str) -> None:
        from ..options import Granularity

        if Granularity.parse(granularity).kind not in self.granularities:
            supported = [g if g != "n:m" else "N:M (e.g. 2:4)" for g in self.granularities]
            raise ValueError(
                f"method={self.name!r} does not support granularity={granularity!r}; it supports {supported}"
            )
