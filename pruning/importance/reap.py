"""REAP, router-weighted expert activation pruning (Lasby et al., 2025, "REAP the Experts: Why Pruning Prevails for
One-Shot MoE Compression"; llm-compressor's expert pruning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..structure import GroupSet
from .base import Criterion, ScoreContext, register
from .frequency import routing_stat


@register
@dataclass
class REAP(Criterion):
    """``score[e] = (1/|X_e|) Σ_{x ∈ X_e} g_e(x) · ‖f_e(x)‖₂``: over the calibration tokens ``X_e`` routed to expert
    ``e`` (its top-k holds ``e``; padding left out), the mean of its output's L2 norm ``f_e(x)`` weighted by the
    routing weight ``g_e(x)`` the layer multiplies that output by (after the family's top-k renormalisation). An
    expert that no token reached scores 0. The expert's output is computed by the experts module itself for the
    tokens routed to it (:func:`~pruning.stats.routing.routing_sums`)."""

    name = "reap"
    needs_activations = True
    act_kinds = ("routing",)
    granularities = ("expert",)

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        raise ValueError("reap scores whole experts only; use granularity='expert'")

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        routed = routing_stat(gs, ctx, "routed")
        return routing_stat(gs, ctx, "reap") / routed.clamp_min(1)
