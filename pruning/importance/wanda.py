"""Wanda (Sun et al., 2023): weight magnitude times input activation norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Criterion, ScoreContext, register


@register
@dataclass
class Wanda(Criterion):
    """``score[i, j] = |W[i, j]| · ‖X[:, j]‖₂`` with ``‖X_j‖₂² = Σ_tokens x_j²`` over the calibration tokens.

    Compared per output row in the paper (``scope='row'``). A group scores the sum of its weights' scores; the
    down-projection columns of an MLP neuron use the norm of that neuron's activation.
    """

    name = "wanda"
    needs_activations = True

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        w = ctx.weights[name].detach().float()
        return w.abs() * ctx.act_norm(name).to(w.device)[None, :]
