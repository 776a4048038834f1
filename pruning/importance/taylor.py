"""LLM-Pruner's first-order Taylor importance (Ma et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..structure import GroupSet
from .base import Criterion, ScoreContext, register


@register
@dataclass
class Taylor(Criterion):
    """First-order Taylor estimate of the loss change when weights are removed, with ``G = Σ_n g_n`` the gradient
    of the calibration loss (next-token cross-entropy summed over the samples, as LLM-Pruner back-propagates it).

    - element: ``score[i, j] = |G[i, j] · W[i, j]|``; a group scores ``Σ_group |G·W|`` (``mode='element'``);
    - vector (``mode='vector'``): a group scores ``|Σ_group G·W|``, the change when the whole group goes at once.
    """

    name = "taylor"
    granularities = (*Criterion.granularities, "expert_neuron", "expert")
    grad_kinds = ("sum",)
    mode: Literal["element", "vector"] = "element"

    def __post_init__(self) -> None:
        if self.mode not in ("element", "vector"):
            raise ValueError(f"taylor mode={self.mode!r} must be 'element' or 'vector'")

    def _gw(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        w = ctx.weights[name].detach().float()
        return ctx.grad_stat(name, "sum").to(w.device) * w

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        return self._gw(name, ctx).abs()

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        if self.mode == "element":
            return super().group_scores(gs, ctx)
        total = torch.zeros(gs.count)
        for m in gs.members:
            gw = self._gw(m.name, ctx)
            gw = m.per_group(gw, gs.count).sum(1)
            total = total.to(gw.device) + gw
        return total.abs()
