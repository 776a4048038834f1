"""Wanda (Sun et al., 2023): weight magnitude times input activation norm; Wanda-sp for neurons and heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..structure import GroupSet
from .base import Criterion, ScoreContext, column_members, register


@register
@dataclass
class Wanda(Criterion):
    """``score[i, j] = |W[i, j]| · ‖X[:, j]‖₂`` with ``‖X_j‖₂² = Σ_tokens x_j²`` over the calibration tokens.

    Compared per output row in the paper (``scope='row'``). Groups (``structured``):

    - ``'sp'`` (default): Wanda-sp, the structured Wanda that FLAP (An et al., 2024) defines and compares against:
      a group scores its columns of the projection that reads it, weighted by that projection's input norms. MLP
      neuron ``i``: ``Σ_j |W_down[j, i]| · ‖x_i‖₂`` with ``x`` the input of down_proj; a query head or KV group: the
      same sum over its o_proj columns with o_proj's input norms. (FLAP's code averages over the rows ``j``: a
      constant factor, the same ranking.) A whole layer has no such columns: it scores the sum over all its
      weights, as ``'sum'``.
    - ``'sum'``: the sum of the element scores of every coupled weight (gate and up rows with the MLP input's
      norms plus the down column; q/k/v rows plus the o columns).
    """

    name = "wanda"
    needs_activations = True
    structured: Literal["sp", "sum"] = "sp"

    def __post_init__(self) -> None:
        if self.structured not in ("sp", "sum"):
            raise ValueError(
                f"wanda structured={self.structured!r} must be 'sp' (Wanda-sp: the output projection's columns, "
                "the default) or 'sum' (every coupled weight)"
            )

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        w = ctx.weights[name].detach().float()
        return w.abs() * ctx.act_norm(name).to(w.device)[None, :]

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        columns = column_members(gs, ctx) if self.structured == "sp" else []
        return self.summed_scores(gs, ctx, columns) if columns else super().group_scores(gs, ctx)
