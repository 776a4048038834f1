"""Magnitude: ``|W|``. The baseline every pruning paper starts from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Criterion, ScoreContext, register


@register
@dataclass
class Magnitude(Criterion):
    """``score[i, j] = |W[i, j]|``; a group scores the sum of its weights' magnitudes."""

    name = "magnitude"

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        return ctx.weights[name].detach().float().abs()
