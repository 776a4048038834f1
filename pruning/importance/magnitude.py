"""Magnitude: ``|W|``. The baseline every pruning paper starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..structure import GroupSet
from .base import Criterion, ScoreContext, matrix_members, register, sum_per_group


@register
@dataclass
class Magnitude(Criterion):
    """``score[i, j] = |W[i, j]|``. A group (``norm``) scores its coupled weights (every 2-D member's slice):

    - ``'l2'`` (default): ``sqrt(Σ_group W²)``, the L2 norm of the group, as Torch-Pruning's and LLM-Pruner's
      magnitude importance (``p=2``; they rank by its square, the same order);
    - ``'l1'``: ``Σ_group |W|``.
    """

    name = "magnitude"
    granularities = (*Criterion.granularities, "expert_neuron", "expert")
    norm: Literal["l2", "l1"] = "l2"

    def __post_init__(self) -> None:
        if self.norm not in ("l2", "l1"):
            raise ValueError(f"magnitude norm={self.norm!r} must be 'l2' (the default) or 'l1'")

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        return ctx.weights[name].detach().float().abs()

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        if self.norm == "l1":
            return super().group_scores(gs, ctx)
        squares = ((m, ctx.weights[m.name].detach().float().square()) for m in matrix_members(gs, ctx))
        return sum_per_group(gs, squares).sqrt()
