"""Routing frequency: how many calibration tokens the router sends to each routed expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks.routing import experts_path
from ..structure import GroupSet
from .base import Criterion, ScoreContext, register


def routing_stat(gs: GroupSet, ctx: ScoreContext, name: str) -> torch.Tensor:
    """The per-expert routing sum ``name`` (``routed``, ``gate`` or ``reap``:
    :func:`~pruning.stats.routing.routing_sums`) of the experts module of the ``expert`` group set ``gs``, fp32."""
    module = experts_path(gs)
    stats = ctx.act.get(module)
    if stats is None or name not in stats.sums:
        raise KeyError(
            f"no routing statistics for {module}. HINT: collect them with ActivationCollector(..., "
            "**criterion.collector_options()) (kinds=('routing',)) on the experts modules"
        )
    return stats.sums[name].float()


@register
@dataclass
class Frequency(Criterion):
    """``score[e] = |X_e|``: the number of calibration tokens whose top-k routing holds expert ``e`` (padding left
    out), counted at the experts module's input, so on the routing of the model as it is (experts removed earlier
    are never chosen). With ``weighted``: ``Σ_{x ∈ X_e} g_e(x)``, the routing weights the layer multiplies the
    expert's output by (a soft frequency). Experts never chosen score 0 and go first."""

    name = "frequency"
    needs_activations = True
    act_kinds = ("routing",)
    granularities = ("expert",)
    weighted: bool = False

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        raise ValueError("frequency scores whole experts only; use granularity='expert'")

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        return routing_stat(gs, ctx, "gate" if self.weighted else "routed")
