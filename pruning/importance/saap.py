"""SAAP (Zheng et al., 2024): vector- and element-wise importance fused with learned homoscedastic uncertainty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from ..distributed import comm_device
from ..options import JOINT
from ..stats.accumulators import summed_count
from ..structure import GroupSet
from .base import Criterion, ScoreContext, register

Normalise = Literal["mean", "minmax"]
SAAP_GRANULARITIES = ("mlp_neuron", "attention_head", "query_head", JOINT)


# ---------------------------------------------------------------------------------------------- the two terms
def vector_term(gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
    """``I_vec[g] = Σ_n |Σ_{weights of g} g_n·w|`` (``GroupGradientStats`` kind ``vector``): the first-order loss
    change when the whole group goes at once, per sample, summed over samples."""
    if gs.key not in ctx.group or "vector" not in ctx.group[gs.key].sums:
        raise KeyError(f"no 'vector' group gradient statistics for {gs.key}")
    return ctx.group[gs.key].sums["vector"].float()


def element_term(gs: GroupSet, ctx: ScoreContext, second_order: bool = False) -> torch.Tensor:
    """``I_elem[g] = Σ_n Σ_{weights of g} |g_n·w|`` (``GradientStats`` kind ``sum_abs_gw`` of every member, biases
    included as in the vector term): the loss change when the group's weights go one at a time.

    ``second_order`` adds LLM-Pruner's diagonal second-order part, the Hessian's diagonal approximated by the Fisher
    of the same per-sample gradients: ``½ Σ_n Σ_{weights of g} (g_n·w)² = ½ Σ w² · Σ_n g_n²`` (kind ``sum_sq``). Per
    sample, ``ΔL_n ≈ −g_n·w + ½ (g_n·w)²`` when ``w`` goes, so ``|g_n·w| + ½ (g_n·w)²`` bounds ``|ΔL_n|``; LLM-Pruner
    subtracts the term inside one absolute value of the summed gradient, here the first-order part is already
    absolute per sample and the second-order part adds to it."""
    total = None
    for m in gs.members:
        s = ctx.grad_stat(m.name, "sum_abs_gw").float()
        if second_order:
            w = ctx.weights[m.name].detach().float().to(s.device)
            s = s + 0.5 * w.square() * ctx.grad_stat(m.name, "sum_sq").float().to(s.device)
        s = m.per_group(s, gs.count).sum(1)
        total = s if total is None else total.to(s.device) + s
    return total


def normalise(x: torch.Tensor, how: Normalise | None = "mean") -> torch.Tensor:
    """Put a layer's term on a scale-free footing before fusing: ``mean`` divides by the layer's mean over its
    groups (ratios kept, mean 1), ``minmax`` maps the layer's range onto [0, 1]; ``None``: already normalised."""
    x = x.float()
    if how is None:
        return x
    if how == "mean":
        return x / x.mean().clamp_min(torch.finfo(torch.float32).tiny)
    if how == "minmax":
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    raise ValueError(f"normalise={how!r} must be 'mean' or 'minmax'")


def layer_densities(terms: Sequence[torch.Tensor], sets: Sequence[GroupSet]) -> list[torch.Tensor]:
    """A term of the groups of several group sets (different kinds, e.g. a layer's MLP neurons and KV groups) made
    comparable across them: per parameter of the group, divided by the mean per parameter of its decoder layer
    over every set (``Σ I / Σ params`` of the layer). An importance per parameter, mean 1 per parameter in every
    layer; for one set of equal groups it is the ``mean`` normalisation (:func:`normalise`)."""
    total: dict[int, list[float]] = {}
    for t, gs in zip(terms, sets):
        acc = total.setdefault(gs.layer, [0.0, 0.0])
        acc[0] += float(t.double().sum())
        acc[1] += float(sum(gs.numels))
    out = []
    for t, gs in zip(terms, sets):
        term, params = total[gs.layer]
        scale = max(term / params, torch.finfo(torch.float32).tiny)
        out.append(t.float() / gs.params_per_group / scale)
    return out


def fused_densities(
    vec: Sequence[torch.Tensor],
    elem: Sequence[torch.Tensor],
    sets: Sequence[GroupSet],
    sigmas: Sequence[Sequence[float]],
) -> list[torch.Tensor]:
    """The joint selection's fused importance per parameter of every set: both terms through
    :func:`layer_densities`, weighted ``1/(2σ²)``; the constant ``log σ₁σ₂`` is left out (it is no importance)."""
    out = []
    for v, e, (s1, s2) in zip(layer_densities(vec, sets), layer_densities(elem, sets), sigmas):
        out.append(v / (2 * s1 * s1) + e.to(v.device) / (2 * s2 * s2))
    return out


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
    how: Normalise | None = "mean",
    iterations: int = 200,
    tol: float = 1e-7,
    eps: float = 1e-4,
    history: list[tuple[float, float]] | None = None,
) -> tuple[float, float]:
    """σ₁, σ₂ of the homoscedastic-uncertainty fusion (Kendall, Gal & Cipolla 2018), learned on calibration batches.

    ``per_batch_terms[b] = (I_vec, I_elem)``, each a vector over the same groups, measured on batch ``b`` alone.
    Each term is normalised per batch (:func:`normalise`; ``how=None``: as given) and read as a noisy observation
    of one latent importance ``Ī[g]`` common to both terms and all batches, with a Gaussian noise of its own,
    ``σ_k`` (homoscedastic: one σ per term, the same for every group and batch). σ and Ī minimise the negative
    log-likelihood

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


Terms = list[tuple[torch.Tensor, torch.Tensor]]  # per batch: (I_vec, I_elem) of one group set


def learn_sigmas(
    per_batch: dict[str, Terms],
    how: Normalise = "mean",
    per_layer: bool = False,
    sets: Sequence[GroupSet] | None = None,
) -> tuple[dict[str, tuple[float, float]], list[tuple[float, float]]]:
    """σ for every group set (by key) from per-batch terms, and the history of the fit (pooled σ only).

    One pair for the whole model (the paper's two scalars: every layer's groups are observations of the same two
    noise levels, each layer normalised on its own, pooled), or with ``per_layer`` one pair per layer. ``sets``
    (the group sets of the keys) of two kinds: the terms are normalised as the joint selection reads them
    (:func:`layer_densities`). What both :func:`pruning.allocation.ranking.saap_scores` (calibration batches) and
    :class:`SigmaWindow` (the optimiser steps of a training run's scoring window) learn σ with."""
    keys = list(per_batch)
    lengths = {len(per_batch[k]) for k in keys}
    if len(lengths) != 1:
        raise ValueError(f"per-batch terms of unequal lengths {sorted(lengths)} across group sets")
    n_batches = lengths.pop()
    by_key = {gs.key: gs for gs in sets or ()}
    joint = len({gs.kind for gs in by_key.values()}) > 1
    if per_layer and not joint:
        return {k: learn_uncertainty_weights(per_batch[k], how=how) for k in keys}, []
    if joint:
        normed = []
        for b in range(n_batches):
            js = [by_key[k] for k in keys]
            v = layer_densities([per_batch[k][b][0] for k in keys], js)
            e = layer_densities([per_batch[k][b][1] for k in keys], js)
            normed.append(dict(zip(keys, zip(v, e))))
        inner: Normalise | None = None  # already normalised, jointly
    else:
        normed = [
            {k: (normalise(per_batch[k][b][0], how), normalise(per_batch[k][b][1], how)) for k in keys}
            for b in range(n_batches)
        ]
        inner = how
    pools: dict = {"model": keys}
    if per_layer:  # joint: one pair per layer, for both kinds of its groups
        pools = {}
        for k in keys:
            pools.setdefault(by_key[k].layer, []).append(k)
    history: list[tuple[float, float]] = []
    sigmas = {}
    for ks in pools.values():
        pooled = [(torch.cat([nb[k][0] for k in ks]), torch.cat([nb[k][1] for k in ks])) for nb in normed]
        pair = learn_uncertainty_weights(pooled, how=inner, history=None if per_layer else history)
        sigmas.update({k: pair for k in ks})
    return sigmas, history


def sigma_options(sigmas: dict[str, tuple[float, float]], how: Normalise = "mean") -> dict:
    """``criterion_options`` carrying learned σ: one pair (``sigma``), or one per group set (``sigmas``)."""
    pairs = {tuple(v) for v in sigmas.values()}
    if len(pairs) == 1:
        return {"sigma": list(next(iter(pairs))), "normalise": how}
    return {"sigmas": {k: list(v) for k, v in sigmas.items()}, "normalise": how}


class SigmaWindow:
    """SAAP's σ learned inside a training run, from the scoring window's batches (an optimiser step each).

    The statistics of the window are running sums (:class:`~pruning.stats.GradientCollector`); at every batch
    boundary (:meth:`close_batch`, once per optimiser step) the two terms of every group set are read off them, and
    the terms added since the previous boundary are that batch's. At the event :meth:`reduce` sums each batch's
    terms over the ranks (the batch of a step is every rank's sequences of it) and :meth:`learned` gives the σ that
    :func:`learn_sigmas` fits: the σ :func:`pruning.allocation.ranking.saap_scores` learns on the same batches.
    Equal to the pre-pass when the weights are frozen in the window (``ImportanceCallback(freeze_weights=True)``);
    when they train, each batch's terms are those of the weights at its step (and the second-order part reads the
    current weights), so σ describes the window as trained. Element statistics held on FSDP2 rows are refused
    (learn σ with ``pruning rank`` instead).
    Checkpoints hold the batches' terms, the sums at the last boundary and the sample count there, merged over the
    ranks as the statistics are (:meth:`merged_state_dict`).
    """

    def __init__(
        self,
        group_sets: list[GroupSet],
        how: Normalise = "mean",
        per_layer: bool = False,
        second_order: bool = False,
    ) -> None:
        self.group_sets = list(group_sets)
        self.how, self.per_layer, self.second_order = how, per_layer, second_order
        self.size = sum(gs.count for gs in self.group_sets)
        self.reset()

    def reset(self) -> None:
        self.terms: list[torch.Tensor] = []  # per batch: [2, Σ groups] (I_vec, I_elem of every group set)
        self.previous = torch.zeros(2, self.size, dtype=torch.float64)  # the sums at the last boundary
        self.seen = 0  # samples in the statistics at the last boundary

    def close_batch(self, gradients) -> bool:
        """End a batch: its terms are the statistics added since the last call (none added: nothing to close)."""
        count = next(iter(gradients.group_stats.values())).count
        if count == self.seen:
            return False
        if any(stat.shard is not None for stat in gradients.stats.values()):
            raise ValueError(
                "saap learn_sigma reads the element statistics at every step, but under FSDP2 they are held on each "
                "rank's rows. HINT: learn σ before the run with `pruning rank` (or saap_scores) and pass it as "
                "criterion_options: {sigma: [σ1, σ2]}"
            )
        ctx = ScoreContext(
            weights={n: p.detach() for n, p in gradients.parameters.items()},
            grad=gradients.stats,
            group=gradients.group_stats,
        )
        now = torch.stack(
            [
                torch.cat([vector_term(gs, ctx).detach().cpu().double() for gs in self.group_sets]),
                torch.cat([element_term(gs, ctx, self.second_order).detach().cpu().double() for gs in self.group_sets]),
            ]
        )
        self.terms.append((now - self.previous).float())
        self.previous, self.seen = now, count
        return True

    @property
    def batches(self) -> dict[str, Terms]:
        """The per-batch terms by group-set key (what :func:`learn_sigmas` reads)."""
        out: dict[str, Terms] = {gs.key: [] for gs in self.group_sets}
        for t in self.terms:
            for gs, v, e in zip(self.group_sets, t[0].split(self._counts), t[1].split(self._counts)):
                out[gs.key].append((v, e))
        return out

    @property
    def _counts(self) -> list[int]:
        return [gs.count for gs in self.group_sets]

    def reduce(self, group=None) -> None:
        """Sum each batch's terms over the ranks (collective; every rank has closed the same batches)."""
        if self.terms and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = torch.stack(self.terms).to(comm_device(group))
            dist.all_reduce(x, group=group)
            self.terms = list(x.cpu().unbind(0))

    def learned(self) -> dict:
        """The ``criterion_options`` learned from the window's batches (σ given, ``learn_sigma`` off)."""
        if len(self.terms) < 2:
            raise ValueError(
                f"saap learn_sigma needs the terms of at least 2 batches of the scoring window, got {len(self.terms)}"
                " (a batch is an optimiser step). HINT: a longer ImportanceCallback window, or a later event"
            )
        sigmas, _ = learn_sigmas(self.batches, self.how, self.per_layer, self.group_sets)
        return {**sigma_options(sigmas, self.how), "learn_sigma": False}

    def state_dict(self) -> dict:
        terms = torch.stack(self.terms) if self.terms else torch.zeros(0, 2, self.size)
        return {"terms": terms, "previous": self.previous.clone(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.terms = list(state["terms"].float().unbind(0))
        self.previous = state["previous"].double().clone()
        self.seen = int(state["seen"])

    def merged_state_dict(self, group=None) -> dict:
        """:meth:`state_dict` summed over the ranks, as the statistics' merged checkpoints are. Collective."""
        state = self.state_dict()
        if not (dist.is_available() and dist.is_initialized()):
            return state
        dev = comm_device(group)
        out = {}
        for k in ("terms", "previous"):
            t = state[k].to(dev, copy=True)
            dist.all_reduce(t, group=group)
            out[k] = t.cpu()
        return {**out, "seen": summed_count(self.seen, group)}

    def load_merged_state_dict(self, state: dict, rank: int) -> None:
        """Rank 0 keeps the merged state, the others start from zero (as the statistics do)."""
        if rank:
            self.reset()
        else:
            self.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- the criterion
@register
@dataclass
class SAAP(Criterion):
    """SAAP's adaptive importance fusion of a structured group (MLP neuron, KV group, query head):

    ``I = I_vec/(2σ₁²) + I_elem/(2σ₂²) + log σ₁σ₂`` with ``I_vec = Σ_n |Σ_group g_n·w|`` (vector-wise) and
    ``I_elem = Σ_n Σ_group |g_n·w|`` (element-wise; with ``second_order`` plus ``½ Σ_n Σ_group (g_n·w)²``, LLM-Pruner's
    diagonal second-order part, see :func:`element_term`), ``g_n`` the per-sequence gradient of the calibration
    cross-entropy, each term normalised per layer (``normalise``: ``mean`` or ``minmax``) before fusing.

    σ: ``sigma: [σ₁, σ₂]`` for every layer, or ``sigmas: {"mlp_neuron.3": [σ₁, σ₂], ...}`` per group set (falling
    back to ``sigma``); without either, σ₁ = σ₂ = 1 (equal weights ½, the starting point of the learning). Learning
    σ needs per-batch terms: :func:`pruning.allocation.ranking.saap_scores` measures them on calibration batches
    (``criterion_options=estimate.criterion_options()``), and in a training run ``learn_sigma: true`` has the
    callbacks learn σ from the scoring window, one batch per optimiser step (:class:`SigmaWindow`); one pair for
    the model, or one per layer (``per_layer_sigma``).

    Heads and neurons together (``granularity='mlp_neuron+attention_head'``, LLM-Pruner's coupled structures of a
    layer pruned in one event under one parameter budget): each term is taken per parameter and divided by the
    layer's mean per parameter over both kinds (:func:`layer_densities`: for one kind of equal groups this is the
    ``mean`` normalisation), fused with σ (learned on the same normalisation), and the groups of lowest fused
    importance per parameter go first until the removed parameters meet the target.
    """

    name = "saap"
    grad_kinds = ("sum_abs_gw",)
    group_kinds = ("vector",)
    granularities = SAAP_GRANULARITIES
    sigma: list[float] | None = None
    sigmas: dict[str, list[float]] | None = None
    normalise: Normalise = "mean"
    second_order: bool = False
    learn_sigma: bool = False
    per_layer_sigma: bool = False

    def __post_init__(self) -> None:
        if self.normalise not in ("mean", "minmax"):
            raise ValueError(f"saap normalise={self.normalise!r} must be 'mean' or 'minmax'")
        for key, s in [("sigma", self.sigma)] + list((self.sigmas or {}).items()):
            if s is not None and (len(s) != 2 or min(float(v) for v in s) <= 0):
                raise ValueError(f"saap {key}={s} must be two positive numbers [σ1, σ2]")
        if self.learn_sigma and (self.sigma is not None or self.sigmas):
            raise ValueError("saap learn_sigma=true learns σ; it cannot also be given. HINT: drop sigma/sigmas")
        # the second-order part reads Σ_n g_n² of every member besides Σ_n |g_n·w|
        self.grad_kinds = ("sum_abs_gw", "sum_sq") if self.second_order else ("sum_abs_gw",)

    def sigma_of(self, key: str) -> tuple[float, float]:
        s = (self.sigmas or {}).get(key, self.sigma)
        return (1.0, 1.0) if s is None else (float(s[0]), float(s[1]))

    def check_granularity(self, granularity: str) -> None:
        from ..options import Granularity

        super().check_granularity(granularity)
        if Granularity.parse(granularity).joint and self.normalise != "mean":
            raise ValueError(
                f"saap normalise={self.normalise!r}: the joint granularity {granularity!r} compares heads and "
                "neurons per parameter against the layer's mean, its only normalisation. HINT: normalise: mean"
            )

    def batch_learner(self, group_sets: list[GroupSet]) -> SigmaWindow | None:
        """With ``learn_sigma``: what learns σ from the scoring window's batches (see :class:`SigmaWindow`)."""
        if not self.learn_sigma:
            return None
        return SigmaWindow(group_sets, self.normalise, self.per_layer_sigma, self.second_order)

    def _check_sigma(self) -> None:
        if self.learn_sigma:
            raise ValueError(
                "saap learn_sigma=true: σ is learned from the per-batch terms of a training run's scoring window, "
                "which this call did not have. HINT: in pruning.prune learn σ first with "
                "pruning.allocation.ranking.saap_scores (or `pruning rank`) and pass criterion_options="
                "estimate.criterion_options()"
            )

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        raise ValueError(
            "saap scores structured groups only; use granularity='mlp_neuron', 'attention_head', 'query_head' or "
            "'mlp_neuron+attention_head'"
        )

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        self._check_sigma()
        vec = normalise(vector_term(gs, ctx), self.normalise)
        elem = normalise(element_term(gs, ctx, self.second_order), self.normalise).to(vec.device)
        return fuse(vec, elem, self.sigma_of(gs.key))

    def group_densities(self, sets: list[GroupSet], ctx: ScoreContext) -> list[torch.Tensor]:
        """Fused importance per parameter, each term divided by its layer's mean per parameter over every set of
        the layer (:func:`layer_densities`); the constant ``log σ₁σ₂`` is left out (it is no importance)."""
        self._check_sigma()
        vec = [vector_term(gs, ctx) for gs in sets]
        elem = [element_term(gs, ctx, self.second_order) for gs in sets]
        return fused_densities(vec, elem, sets, [self.sigma_of(gs.key) for gs in sets])
