"""SDMPrune (2025): self-distillation gradients on coupled MLP neurons."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..structure import GroupSet
from .base import Criterion, ScoreContext, register


@register
@dataclass
class SDM(Criterion):
    """``score[i] = mean_j Σ_n | G_gate[i,j]·W_gate[i,j] + G_up[i,j]·W_up[i,j] + G_down[j,i]·W_down[j,i] |``

    with ``g_n`` the per-sequence gradient of ``(1−α)·CE + α·KL(softmax(z_teacher/t) ‖ softmax(z_student))``, the
    teacher being the original model. The sum over the coupled weights comes before the absolute value. The
    statistic is accumulated by :class:`~pruning.stats.GroupGradientStats` (``'coupled'``) in fp32 (the authors'
    ×100 scaling only kept bf16 in range). Attention KV groups use the same form, aligned on the hidden axis.
    The loss that produces the gradients belongs to the caller (``pruning.losses`` or the Lightning module).

    A whole routed expert (``granularity='expert'``) has no hidden axis all its weights share (its router row, its
    gate/up rows and its down columns are of different shapes), so its distillation gradient is summed over all of
    them before the absolute value: ``score[e] = Σ_n | Σ_{w ∈ expert e} g_n[w]·w |`` (the ``vector`` statistic of
    :class:`~pruning.stats.GroupGradientStats`, one backward per sequence: expert weights are not Linears).
    """

    name = "sdm"
    group_kinds = ("coupled",)
    distills = True
    granularities = ("mlp_neuron", "attention_head", "query_head", "expert")

    def group_statistics(self, granularity: str) -> tuple[str, ...]:
        return ("vector",) if granularity == "expert" else self.group_kinds

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        raise ValueError("sdm scores coupled groups only; use granularity='mlp_neuron' (the paper's)")

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        kind = self.group_statistics(gs.kind)[0]
        if gs.key not in ctx.group or kind not in ctx.group[gs.key].sums:
            raise KeyError(f"no {kind} gradient statistics for {gs.key}")
        return ctx.group[gs.key].sums[kind]
