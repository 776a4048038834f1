"""SAAP's layer ranking: an importance-fluctuation indicator per layer decides which layers lose how much.

Also the repair every non-uniform allocation here needs (:func:`project_rates`): per-layer rates in whole groups,
within ``[0, max_rate]``, whose mean is the target. ``pruning rank`` (:mod:`pruning.commands.rank`) runs SAAP's
estimation on a model and writes the learned σ and the layer rates for a recipe (``criterion_options`` and
``rates_file``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

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
def project_rates(
    rates: Sequence[float],
    target: float,
    counts: Sequence[int],
    partitions: int = 1,
    max_rate: float = 0.9,
    fixed_zero: Sequence[int] = (),
) -> list[float]:
    """The nearest allocation that can be pruned: rates in whole groups, in ``[0, max_rate]``, mean = ``target``.

    ``counts[l]``: groups in layer ``l``; with ``partitions`` > 1 (query heads in KV groups) a layer moves in
    steps of one group per partition (a *unit*). A common shift ``τ`` is found by bisection such that
    ``mean(clip(r_l + τ, 0, hi_l)) = target`` (clip-and-shift: the order of the layers' rates is kept), then
    each layer's pruned units are rounded down and the remaining units go to the layers with the largest
    fractional parts. Returned rates are ``k_l / units_l``, so ``pruning.prune(allocation='rates')`` removes
    exactly ``k_l`` units per layer. Their mean equals ``target`` whenever ``target · Σ units`` is a whole number
    (equal layers), else it is the closest reachable value (within half a unit of one layer).
    ``fixed_zero``: layers that are not pruned at all (the others make up for them).
    """
    n_layers = len(counts)
    if len(rates) != n_layers:
        raise ValueError(f"{len(rates)} rates given for {n_layers} layers")
    if not 0 <= target < 1:
        raise ValueError(f"target={target} must be in [0, 1)")
    if not 0 < max_rate < 1:
        raise ValueError(f"max_rate={max_rate} must be in (0, 1)")
    p = max(1, partitions)
    units = [c // p for c in counts]
    fixed = set(fixed_zero)
    hi = [0 if i in fixed else min(int(math.floor(max_rate * u + 1e-9)), u - 1) for i, u in enumerate(units)]
    goal = target * n_layers  # Σ k_l / u_l
    reachable = sum(h / u for h, u in zip(hi, units))
    if goal > reachable + 1e-9:
        raise ValueError(
            f"target={target} cannot be met with max_rate={max_rate}"
            + (f" and layers {sorted(fixed)} left unpruned" if fixed else "")
            + f": the most the layers can lose is a mean rate of {reachable / n_layers:.4f}. "
            "HINT: raise max_rate or lower the target"
        )
    r = [float(x) for x in rates]
    cap = [h / u for h, u in zip(hi, units)]

    def mean_at(tau: float) -> float:
        return sum(min(max(x + tau, 0.0), c) for x, c in zip(r, cap)) / n_layers

    lo_t, hi_t = -max(r) - 1.0, 1.0 - min(r) + 1.0
    for _ in range(200):
        mid = (lo_t + hi_t) / 2
        if mean_at(mid) < target:
            lo_t = mid
        else:
            hi_t = mid
    cont = [min(max(x + hi_t, 0.0), c) * u for x, c, u in zip(r, cap, units)]  # real units per layer
    k = [min(int(math.floor(x + 1e-9)), h) for x, h in zip(cont, hi)]
    frac = [x - kk for x, kk in zip(cont, k)]

    def err(kk: list[int]) -> float:
        return goal - sum(a / u for a, u in zip(kk, units))

    # hand out (or take back) single units, largest fractional part first, while that brings the mean closer
    for _ in range(sum(units) + 1):
        e = err(k)
        if e > 0:
            order = sorted((i for i in range(n_layers) if k[i] < hi[i]), key=lambda i: (-frac[i], i))
            best = next((i for i in order if abs(e - 1 / units[i]) < abs(e) - 1e-12), None)
            if best is None:
                break
            k[best] += 1
            frac[best] -= 1
        elif e < 0:
            order = sorted((i for i in range(n_layers) if k[i] > 0), key=lambda i: (frac[i], i))
            best = next((i for i in order if abs(e + 1 / units[i]) < abs(e) - 1e-12), None)
            if best is None:
                break
            k[best] -= 1
            frac[best] += 1
        else:
            break
    return [kk / u for kk, u in zip(k, units)]


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
    """SAAP's non-uniform rates from a :class:`~pruning.importance.saap.SAAPEstimate`: ``(rates, indicator)``.

    The indicator is the *importance fluctuation* of each layer's fused group scores: ``batches`` (default) —
    across calibration batches (:func:`fluctuation_across_batches`); ``groups`` — across the layer's groups
    (:func:`fluctuation_across_groups`, which summed statistics also allow). Layers whose importances are stable
    (low fluctuation) are pruned more: their low scores are reliably low, while a layer whose importances move
    with the input needs more of its groups for some inputs. The mean rate is ``target`` (see
    :func:`project_rates`).
    """
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
