"""GBLM-Pruner (Das et al., 2023): gradient-based unstructured pruning with Wanda's activation term."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import Criterion, ScoreContext, register


@register
@dataclass
class GBLM(Criterion):
    """``score[i, j] = |W[i, j]| · ‖X[:, j]‖₂ + α · |W[i, j]| · G[i, j]``

    with ``G = sqrt(Σ_n g_n²)`` (``gradient_norm='l2'``, the paper's default) or ``G = Σ_n |g_n|`` (``'l1'``), the
    per-sequence gradients of next-token cross-entropy on the *dense* model, and ``‖X_j‖₂² = Σ_tokens x_j²``.

    ``alpha`` multiplies raw norms here (default 100). The authors' code averages the activation term over samples
    and scales gradients by 100, which makes their α worth ``α_ours = 100 · √N · α_theirs`` against raw norms
    (N samples): ``alpha: authors`` is that weighting (their α = 1), N being the number of per-sequence gradients
    the statistics hold.
    """

    name = "gblm"
    needs_activations = True
    alpha: float | Literal["authors"] = 100.0
    gradient_norm: Literal["l2", "l1"] = "l2"

    def __post_init__(self) -> None:
        if self.gradient_norm not in ("l2", "l1"):
            raise ValueError(f"gblm gradient_norm={self.gradient_norm!r} must be 'l2' or 'l1'")
        if self.alpha != "authors" and (isinstance(self.alpha, str) or self.alpha < 0):
            raise ValueError(f"gblm alpha={self.alpha!r} must be a number >= 0 or 'authors' (100·√N)")

    def weight(self, name: str, ctx: ScoreContext) -> float:
        """α against raw norms: the given number, or the authors' 100·√N (N per-sequence gradients)."""
        if self.alpha != "authors":
            return float(self.alpha)
        return 100.0 * math.sqrt(ctx.grad_count(name))

    @property
    def grad_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("sum_sq",) if self.gradient_norm == "l2" else ("sum_abs",)

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        w = ctx.weights[name].detach().float().abs()
        if self.gradient_norm == "l2":
            g = ctx.grad_stat(name, "sum_sq").to(w.device).sqrt()
        else:
            g = ctx.grad_stat(name, "sum_abs").to(w.device)
        return w * ctx.act_norm(name).to(w.device)[None, :] + self.weight(name, ctx) * w * g
