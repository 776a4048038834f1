"""SAAP's layer ranking: an importance-fluctuation indicator per layer decides which layers lose how much (the
rates are repaired into whole groups with the target mean by :func:`pruning.allocation.rates.project_rates`).
``pruning rank`` (:mod:`pruning.commands.rank`) runs SAAP's estimation on a model and writes the learned σ and the
layer rates for a recipe (``criterion_options`` and ``rates_file``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..importance.saap import (
    SAAP_GRANULARITIES,
    Normalise,
    element_term,
    fuse,
    fused_densities,
    learn_sigmas,
    normalise,
    sigma_options,
    vector_term,
)
from ..options import PruneOptions
from ..pipeline.calibration import calibration_batches, collect_gradients
from ..pipeline.pruner import Pruner
from .rates import project_rates

Fluctuation = Literal["batches", "groups"]


# ---------------------------------------------------------------------------------------------- the indicator
def fluctuation_across_batches(per_batch: Sequence[torch.Tensor]) -> float:
    """How much a layer's group importances move from one calibration batch to the next: the mean over its groups
    of ``std_b(I_g,b) / mean_b(I_g,b)`` (coefficient of variation across batches)."""
    x = torch.stack([t.double() for t in per_batch])  # [B, G]
    mean = x.mean(0)
    cv = x.std(0, unbiased=True) / mean.abs().clamp_min(1e-12)
    return float(cv[mean.abs() > 1e-12].mean()) if bool((mean.abs() > 1e-12).any()) else 0.0


def fluctuation_across_groups(scores: torch.Tensor) -> float:
    """How uneven a layer's group importances are: ``std_g(I_g) / mean_g(I_g)`` (coefficient of variation across
    groups), for statistics summed over the calibration set (no per-batch record needed)."""
    x = scores.double()
    return float(x.std(unbiased=True) / x.mean().abs().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------- rates
def ranked_rates(
    indicator: Sequence[float],
    target: float,
    counts: Sequence[int],
    partitions: int = 1,
    spread: float = 0.1,
    max_rate: float = 0.9,
    skip_layers: Sequence[int] = (),
) -> list[float]:
    """Rates from a ranking of the layers by ``indicator`` (low = prune more).

    Layers are sorted by the indicator; the lowest gets ``target + spread``, the highest ``target − spread``,
    linearly in rank between (a mean of exactly ``target`` before clipping); ``skip_layers`` are not pruned; then
    :func:`project_rates` puts them in whole groups within ``[0, max_rate]`` with mean ``target``. A spread
    larger than the target leaves the top-ranked layers unpruned: the ranking decides which layers are pruned,
    and how much.
    """
    n = len(indicator)
    if spread < 0:
        raise ValueError(f"spread={spread} must be >= 0")
    order = sorted(range(n), key=lambda i: (float(indicator[i]), i))
    rates = [target] * n
    for pos, layer in enumerate(order):
        rates[layer] = target + spread * (1 - 2 * pos / (n - 1)) if n > 1 else target
    for i in skip_layers:
        rates[i] = 0.0
    return project_rates(rates, target, counts, partitions, max_rate, fixed_zero=skip_layers)


def saap_layer_rates(
    estimate,
    target: float,
    fluctuation: Fluctuation = "batches",
    spread: float = 0.1,
    max_rate: float = 0.9,
    skip_layers: Sequence[int] = (),
) -> tuple[list[float], list[float]]:
    """SAAP's non-uniform rates from a :class:`SAAPEstimate`: ``(rates, indicator)``.

    The indicator is the *importance fluctuation* of each layer's fused group scores: ``batches`` (default) —
    across calibration batches (:func:`fluctuation_across_batches`); ``groups`` — across the layer's groups
    (:func:`fluctuation_across_groups`, which summed statistics also allow). Layers whose importances are stable
    (low fluctuation) are pruned more: their low scores are reliably low, while a layer whose importances move
    with the input needs more of its groups for some inputs. The mean rate is ``target`` (see
    :func:`project_rates`).
    """
    if len(set(k.split(".")[0] for k in estimate.keys)) > 1:
        raise ValueError(
            f"SAAP's layer ranking gives one rate per layer for one kind of group, not for granularity="
            f"{estimate.granularity!r}. HINT: rank with granularity='mlp_neuron' (or a head kind)"
        )
    if fluctuation == "batches":
        # the log σ₁σ₂ constant is dropped: a shift of every score would change the coefficient of variation
        ind = [
            fluctuation_across_batches([s - s.new_tensor(_log_const(estimate, k)) for s in estimate.batch_scores[k]])
            for k in estimate.keys
        ]
    elif fluctuation == "groups":
        ind = [fluctuation_across_groups(estimate.scores[k] - _log_const(estimate, k)) for k in estimate.keys]
    else:
        raise ValueError(f"fluctuation={fluctuation!r} must be 'batches' or 'groups'")
    rates = ranked_rates(ind, target, estimate.counts, estimate.partitions, spread, max_rate, skip_layers)
    return rates, ind


def _log_const(estimate, key: str) -> float:
    s1, s2 = estimate.sigmas[key]
    return math.log(s1 * s2)


# ---------------------------------------------------------------------------------------------- SAAP's estimate
@dataclass
class SAAPEstimate:
    """What :func:`saap_scores` measured: per group-set key (e.g. ``mlp_neuron.3``) the per-batch terms, σ, the
    fused scores of the whole calibration set and the fused scores of every batch (for the fluctuation ranking)."""

    granularity: str
    keys: list[str]
    per_batch: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    sigmas: dict[str, tuple[float, float]]
    scores: dict[str, torch.Tensor]
    batch_scores: dict[str, list[torch.Tensor]]
    counts: list[int]
    partitions: int = 1
    normalise: Normalise = "mean"
    sigma_history: list[tuple[float, float]] = field(default_factory=list)
    second_order: bool = False

    def criterion_options(self) -> dict:
        """``criterion_options`` for ``pruning.prune(method='saap')``: the learned σ (one pair, or one per layer)."""
        out = sigma_options(self.sigmas, self.normalise)
        return {**out, "second_order": True} if self.second_order else out


def _batch(per_batch: dict, b: int) -> tuple[dict, dict]:
    """Batch ``b``'s vector and element terms, by key."""
    return {k: t[b][0] for k, t in per_batch.items()}, {k: t[b][1] for k, t in per_batch.items()}


def _joint_fused(vec: dict, elem: dict, group_sets: list, sigmas: dict) -> dict[str, torch.Tensor]:
    """The fused importance per parameter the joint selection compares (:meth:`SAAP.group_densities`), by key."""
    keys = [gs.key for gs in group_sets]
    fused = fused_densities([vec[k] for k in keys], [elem[k] for k in keys], group_sets, [sigmas[k] for k in keys])
    return dict(zip(keys, fused))


def saap_scores(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    granularity: Literal["mlp_neuron", "attention_head", "query_head", "mlp_neuron+attention_head"] = "mlp_neuron",
    *,
    per_layer_sigma: bool = False,
    how: Normalise = "mean",
    second_order: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> SAAPEstimate:
    """Measure SAAP's two terms on every calibration batch separately, learn σ and fuse.

    Every ``[batch, seq]`` tensor of ``calibration`` is one estimate (its sequences are the samples, one backward
    each, gradients of plain next-token cross-entropy on the model as it is). σ is one pair for the whole model
    (the paper's two scalars; ``per_layer_sigma`` learns one pair per layer), learned by
    :func:`~pruning.importance.saap.learn_sigmas` on the per-batch terms, each layer normalised on its own (the
    function a training run's scoring window learns σ with, :class:`~pruning.importance.saap.SigmaWindow`). The
    fused scores of the whole calibration set use the summed statistics, exactly what ``pruning.prune(method='saap',
    criterion_options=estimate.criterion_options())`` computes from the same calibration data (for the joint
    granularity: the fused importances per parameter the joint selection compares). ``second_order``: the
    element-wise term with its diagonal second-order part (:func:`~pruning.importance.saap.element_term`).
    """
    if granularity not in SAAP_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: saap scores {list(SAAP_GRANULARITIES)}")
    options = PruneOptions(
        method="saap", granularity=granularity, sparsity=0.0, criterion_options={"second_order": second_order}
    )
    pruner = Pruner(model, options)
    group_sets = pruner.targets.group_sets
    collector = pruner.gradient_collector()
    batches = calibration_batches(calibration)
    per_batch: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {gs.key: [] for gs in group_sets}
    total_vec = {gs.key: torch.zeros(gs.count) for gs in group_sets}
    total_elem = {gs.key: torch.zeros(gs.count) for gs in group_sets}
    for ids in tqdm(batches, desc="saap", unit="batch", disable=not progress):
        collector.reset()
        collect_gradients(model, [ids], collector, device=device, progress=False)
        ctx = pruner.context(gradients=collector)
        for gs in group_sets:
            # the buffers are reset for the next batch: copies
            v, e = vector_term(gs, ctx).cpu().clone(), element_term(gs, ctx, second_order).cpu().clone()
            per_batch[gs.key].append((v, e))
            total_vec[gs.key] += v
            total_elem[gs.key] += e
    keys = [gs.key for gs in group_sets]
    sigmas, history = learn_sigmas(per_batch, how, per_layer_sigma, group_sets)
    if len({gs.kind for gs in group_sets}) > 1:  # joint: fused importance per parameter, normalised per layer
        scores = _joint_fused(total_vec, total_elem, group_sets, sigmas)
        per = [_joint_fused(*_batch(per_batch, b), group_sets, sigmas) for b in range(len(batches))]
        batch_scores = {k: [p[k] for p in per] for k in keys}
    else:
        scores = {k: fuse(normalise(total_vec[k], how), normalise(total_elem[k], how), sigmas[k]) for k in keys}
        batch_scores = {
            k: [fuse(normalise(v, how), normalise(e, how), sigmas[k]) for v, e in per_batch[k]] for k in keys
        }
    return SAAPEstimate(
        granularity=granularity,
        keys=keys,
        per_batch=per_batch,
        sigmas=sigmas,
        scores=scores,
        batch_scores=batch_scores,
        counts=[gs.count for gs in group_sets],
        partitions=group_sets[0].partitions,
        normalise=how,
        sigma_history=history,
        second_order=second_order,
    )
