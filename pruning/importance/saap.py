"""SAAP (Zheng et al., 2024): vector- and element-wise importance fused with learned homoscedastic uncertainty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..structure import GroupSet
from .base import Criterion, ScoreContext, register

Normalise = Literal["mean", "minmax"]
SAAP_GRANULARITIES = ("mlp_neuron", "attention_head", "query_head")


# ---------------------------------------------------------------------------------------------- the two terms
def vector_term(gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
    """``I_vec[g] = Σ_n |Σ_{weights of g} g_n·w|`` (``GroupGradientStats`` kind ``vector``): the first-order loss
    change when the whole group goes at once, per sample, summed over samples."""
    if gs.key not in ctx.group or "vector" not in ctx.group[gs.key].sums:
        raise KeyError(f"no 'vector' group gradient statistics for {gs.key}")
    return ctx.group[gs.key].sums["vector"].float()


def element_term(gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
    """``I_elem[g] = Σ_n Σ_{weights of g} |g_n·w|`` (``GradientStats`` kind ``sum_abs_gw`` of every member, biases
    included as in the vector term): the loss change when the group's weights go one at a time."""
    total = None
    for m in gs.members:
        s = ctx.grad_stat(m.name, "sum_abs_gw").float()
        s = (s.movedim(m.dim, 0) if m.dim else s).reshape(gs.count, -1).sum(1)
        total = s if total is None else total.to(s.device) + s
    return total


def normalise(x: torch.Tensor, how: Normalise = "mean") -> torch.Tensor:
    """Put a layer's term on a scale-free footing before fusing: ``mean`` divides by the layer's mean over its
    groups (ratios kept, mean 1), ``minmax`` maps the layer's range onto [0, 1]."""
    x = x.float()
    if how == "mean":
        return x / x.mean().clamp_min(torch.finfo(torch.float32).tiny)
    if how == "minmax":
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    raise ValueError(f"normalise={how!r} must be 'mean' or 'minmax'")


def fuse(vec: torch.Tensor, elem: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """``I = I_vec/(2σ₁²) + I_elem/(2σ₂²) + log σ₁σ₂`` (terms already normalised). The log term is the same for
    every group, so it changes no ranking; it is kept so that the score is the paper's."""
    s1, s2 = (float(s) for s in sigma)
    if s1 <= 0 or s2 <= 0:
        raise ValueError(f"sigma={list(sigma)} must be two positive numbers")
    return vec / (2 * s1 * s1) + elem / (2 * s2 * s2) + math.log(s1 * s2)


# ---------------------------------------------------------------------------------------------- learning σ
def learn_uncertainty_weights(
    per_batch_terms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    how: Normalise = "mean",
    iterations: int = 200,
    tol: float = 1e-7,
    eps: float = 1e-4,
    history: list[tuple[float, float]] | None = None,
) -> tuple[float, float]:
    """σ₁, σ₂ of the homoscedastic-uncertainty fusion (Kendall, Gal & Cipolla 2018), learned on calibration batches.

    ``per_batch_terms[b] = (I_vec, I_elem)``, each a vector over the same groups, measured on batch ``b`` alone.
    Each term is normalised per batch (:func:`normalise`) and read as a noisy observation of one latent importance
    ``Ī[g]`` common to both terms and all batches, with a Gaussian noise of its own, ``σ_k`` (homoscedastic: one σ
    per term, the same for every group and batch). σ and Ī minimise the negative log-likelihood

        ``L(Ī, σ) = Σ_b Σ_g Σ_k [ (I_k,b[g] − Ī[g])² / (2σ_k²) + log σ_k ]``,

    by exact block coordinate descent from σ₁ = σ₂ = 1 (equal weights): ``Ī = Σ_k w_k Ī_k / Σ_k w_k`` with
    ``w_k = 1/σ_k²`` and ``Ī_k`` the term's mean over batches, then ``σ_k² = mean_{b,g} (I_k,b − Ī)²`` (floored at
    ``eps²``). Each step minimises L exactly over its block, so L never increases and the iteration converges;
    it stops when σ moves less than ``tol``. A term whose per-batch estimates fluctuate more (or that disagrees
    with the consensus) gets a larger σ and a smaller weight ``1/(2σ²)`` in :func:`fuse`; since that fused score
    is ``Σ_k w_k I_k / 2`` plus a constant, it ranks groups exactly as the maximum-likelihood latent importance
    does. (Adam on L, as in Kendall et al., reaches the same minimiser; the closed form needs no learning rate.)

    ``history``, if given, receives ``(σ₁, σ₂)`` after every iteration (starting with ``(1, 1)``).
    """
    if len(per_batch_terms) < 2:
        raise ValueError(
            f"learning σ needs per-batch terms from at least 2 calibration batches, got "
            f"{len(per_batch_terms)}. HINT: split the calibration data into more batches"
        )
    x = torch.stack([torch.stack([normalise(v, how), normalise(e, how)]) for v, e in per_batch_terms])
    x = x.double()  # [B, 2, G]
    means = x.mean(0)  # [2, G]
    var = torch.ones(2, dtype=torch.float64)
    if history is not None:
        history.append((1.0, 1.0))
    for _ in range(iterations):
        w = 1.0 / var
        latent = (w[:, None] * means).sum(0) / w.sum()
        new = ((x - latent).square().mean(dim=(0, 2))).clamp_min(eps * eps)
        moved = float((new.sqrt() - var.sqrt()).abs().max())
        var = new
        if history is not None:
            history.append((float(var[0].sqrt()), float(var[1].sqrt())))
        if moved < tol:
            break
    s = var.sqrt()
    return float(s[0]), float(s[1])


# ---------------------------------------------------------------------------------------------- the criterion
@register
@dataclass
class SAAP(Criterion):
    """SAAP's adaptive importance fusion of a structured group (MLP neuron, KV group, query head):

    ``I = I_vec/(2σ₁²) + I_elem/(2σ₂²) + log σ₁σ₂`` with ``I_vec = Σ_n |Σ_group g_n·w|`` (vector-wise) and
    ``I_elem = Σ_n Σ_group |g_n·w|`` (element-wise), ``g_n`` the per-sequence gradient of the calibration
    cross-entropy, each term normalised per layer (``normalise``: ``mean`` or ``minmax``) before fusing.

    σ comes from the options: ``sigma: [σ₁, σ₂]`` for every layer, or ``sigmas: {"mlp_neuron.3": [σ₁, σ₂], ...}``
    per group set (falling back to ``sigma``). Learning σ needs per-batch statistics, which the summed statistics
    of ``pruning.prune`` and of the Lightning callbacks do not keep: :func:`pruning.allocation.ranking.saap_scores`
    measures them on calibration batches and returns options to pass here
    (``criterion_options=estimate.criterion_options()``).
    Without σ the default is σ₁ = σ₂ = 1 (equal weights ½), the starting point of the learning.
    """

    name = "saap"
    grad_kinds = ("sum_abs_gw",)
    group_kinds = ("vector",)
    granularities = SAAP_GRANULARITIES
    sigma: list[float] | None = None
    sigmas: dict[str, list[float]] | None = None
    normalise: Normalise = "mean"

    def __post_init__(self) -> None:
        if self.normalise not in ("mean", "minmax"):
            raise ValueError(f"saap normalise={self.normalise!r} must be 'mean' or 'minmax'")
        for key, s in [("sigma", self.sigma)] + list((self.sigmas or {}).items()):
            if s is not None and (len(s) != 2 or min(float(v) for v in s) <= 0):
                raise ValueError(f"saap {key}={s} must be two positive numbers [σ1, σ2]")

    def sigma_of(self, key: str) -> tuple[float, float]:
        s = (self.sigmas or {}).get(key, self.sigma)
        return (1.0, 1.0) if s is None else (float(s[0]), float(s[1]))

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        raise ValueError(
            "saap scores structured groups only; use granularity='mlp_neuron', 'attention_head' or 'query_head'"
        )

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        vec = normalise(vector_term(gs, ctx), self.normalise)
        elem = normalise(element_term(gs, ctx), self.normalise).to(vec.device)
        return fuse(vec, elem, self.sigma_of(gs.key))
