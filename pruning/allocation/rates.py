"""How much each layer loses: kept counts (uniform, from rates, global ranking), OWL's outlier-weighted rates, the
repair of any proposed rates into whole groups with the target mean, and the rates files written by the searches."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .selection import exclude_pruned


def keep_counts_uniform(counts: Sequence[int], sparsity: float, partitions: int = 1) -> list[int]:
    """Same fraction removed in every layer (the same count where layers are equal: a stock config)."""
    out = []
    for n in counts:
        keep = n - int(math.floor(sparsity * n + 1e-9))
        out.append(_round_partitions(keep, partitions))
    return out


def keep_counts_from_rates(counts: Sequence[int], rates: Sequence[float], partitions: int = 1) -> list[int]:
    if len(rates) != len(counts):
        raise ValueError(f"{len(rates)} layer rates given for {len(counts)} layers")
    return [_round_partitions(n - int(round(r * n)), partitions) for n, r in zip(counts, rates)]


def _round_partitions(keep: int, partitions: int) -> int:
    """Round down to a whole number per partition, keeping at least one per partition (a KV group with no query
    head left cannot be expressed)."""
    return max(partitions, (keep // partitions) * partitions) if partitions > 1 else keep


def keep_counts_global(
    scores: Sequence[torch.Tensor],
    sparsity: float,
    min_keep: float = 0.0,
    max_keep: float = 1.0,
    prev: Sequence[torch.Tensor | None] | None = None,
    partitions: int = 1,
    min_units: int = 0,
) -> list[int]:
    """Global ranking of groups across layers, each layer keeping between ``min_keep`` and ``max_keep`` of its
    groups, and at least ``min_units`` steps (e.g. one KV group: a layer without attention cannot be expressed).
    Scores are compared raw: use a criterion whose scale is comparable across layers.

    With ``partitions`` > 1 (query heads sharing KV heads) a layer's count moves in steps of one group per
    partition and keeps at least one per partition, as :func:`topk_keep` needs; step ``r`` of a layer scores the
    mean of its partitions' ``r``-th best groups."""
    p = max(1, partitions)
    counts = [s.numel() for s in scores]
    total_keep = sum(counts) - int(math.floor(sparsity * sum(counts) + 1e-9))
    units = [n // p for n in counts]
    total_units = total_keep // p
    lo = [max(int(math.ceil(min_keep * u)), min_units) for u in units]
    if p > 1:
        lo = [max(1, x) for x in lo]
    hi = [int(math.floor(max_keep * u)) for u in units]
    if sum(lo) > total_units or sum(hi) < total_units or any(a > b for a, b in zip(lo, hi)):
        raise ValueError(
            f"min_keep={min_keep}/max_keep={max_keep} cannot be met at sparsity={sparsity}: the bounds allow "
            f"keeping {sum(lo) * p}..{sum(hi) * p} groups, the target keeps {total_keep}"
            + (f" (whole steps of {p} groups, at least one per partition)" if p > 1 else "")
        )
    keep = list(lo)
    cand = []
    for li, s in enumerate(scores):
        s = exclude_pruned(s.float().cpu(), None if prev is None else prev[li])
        step = s.view(p, -1).sort(dim=1, descending=True).values.mean(0)
        cand += [(float(v), li, rank) for rank, v in enumerate(step.tolist()) if rank >= lo[li]]
    cand.sort(key=lambda t: (-t[0], t[1], t[2]))
    budget = total_units - sum(keep)
    for _, li, _ in cand:
        if budget == 0:
            break
        if keep[li] < hi[li]:
            keep[li] += 1
            budget -= 1
    return [k * p for k in keep]


def owl_rates(outlier_ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL (Yin et al., 2024): layers with more outliers keep more. Ratios are mapped linearly onto a range of
    width ``2λ`` and shifted so that the mean rate is exactly ``sparsity``."""
    d = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    span = d.max() - d.min()
    scaled = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    keep = scaled - scaled.mean() + (1 - sparsity)
    rates = (1 - keep).clamp(0.0, 1.0)
    return rates.tolist()


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Share of a layer's (Wanda) scores above ``m`` times their layer mean."""
    flat = torch.cat([s.float().flatten() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def load_rates_file(
    path: str | os.PathLike,
    criterion: str | None = None,
    granularity: str | None = None,
    num_layers: int | None = None,
    key: str = "rates_file",
) -> tuple[list[float], dict]:
    """``(layer_rates, criterion_options)`` from the JSON that ``pruning search`` (Self-Pruner) or ``pruning rank``
    (SAAP) writes. The options are the file's ``criterion_options`` when they were learned for ``criterion`` (SAAP's
    σ for ``saap``), else empty: the rates themselves serve any criterion. Errors name ``key`` and say what to run.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"{key}={str(path)!r}: no such file. HINT: write it first with `pruning search ... --out {path}` "
            f"(Self-Pruner's layer rates) or `pruning rank ... --out {path}` (SAAP's)"
        )
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}={str(path)!r} is not valid JSON: {e}") from e
    rates = obj.get("layer_rates") if isinstance(obj, dict) else obj
    if (
        not isinstance(rates, list)
        or not rates
        or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1 for r in rates)
    ):
        raise ValueError(f"{key}={str(path)!r}: expected a list `layer_rates` of numbers in [0, 1), got {rates!r}")
    if num_layers is not None and len(rates) != num_layers:
        raise ValueError(
            f"{key}={str(path)!r} has {len(rates)} layer rates, the model has {num_layers} layers. "
            "HINT: the file was written for another model"
        )
    info = obj if isinstance(obj, dict) else {}
    if granularity is not None and info.get("granularity") not in (None, granularity):
        raise ValueError(
            f"{key}={str(path)!r} holds rates for granularity={info['granularity']!r}, not {granularity!r}"
        )
    options = {}
    if criterion is not None and info.get("method") == criterion and isinstance(info.get("criterion_options"), dict):
        options = dict(info["criterion_options"])
    return [float(r) for r in rates], options


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
