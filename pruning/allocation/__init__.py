"""How much each layer loses, and which entries go: comparison groups, N:M, structured top-k, OWL."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

NEG_INF = float("-inf")


def _exclude_pruned(scores: torch.Tensor, prev_keep: torch.Tensor | None) -> torch.Tensor:
    """Already-pruned entries score -inf, so a monotone update removes them first and counts them."""
    if prev_keep is None:
        return scores
    return scores.float().masked_fill(~prev_keep.to(scores.device).bool(), NEG_INF)


def select_unstructured(
    scores: torch.Tensor,
    sparsity: float,
    scope: str = "row",
    prev_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep mask removing the lowest-scoring ``floor(sparsity · n)`` entries of each comparison group.

    ``scope='row'``: every output row loses the same number of weights (Wanda's and GBLM's comparison group);
    ``scope='layer'``: the whole tensor is one group. Ties are broken by position so that counts are exact.
    """
    s = _exclude_pruned(scores.float(), prev_keep)
    if scope == "row":
        k = int(math.floor(sparsity * s.shape[1] + 1e-9))
        keep = torch.ones_like(s, dtype=torch.bool)
        if k:
            idx = torch.topk(s, k, dim=1, largest=False, sorted=False).indices
            keep.scatter_(1, idx, False)
        return keep
    if scope == "layer":
        k = int(math.floor(sparsity * s.numel() + 1e-9))
        keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
        if k:
            keep[torch.topk(s.flatten(), k, largest=False, sorted=False).indices] = False
        return keep.view_as(s)
    raise ValueError(f"scope={scope!r} must be 'row', 'layer' or 'global'")


def select_nm(scores: torch.Tensor, n: int, m: int, prev_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive input columns in each row."""
    from ..masks import nm_mask

    return nm_mask(_exclude_pruned(scores.float(), prev_keep), n, m)


def select_global_unstructured(
    scores: dict[str, torch.Tensor], sparsity: float, prev: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """One threshold over all tensors: the lowest ``floor(sparsity · N)`` scores model-wide are removed."""
    flat = torch.cat([_exclude_pruned(s, prev.get(n)).flatten().cpu() for n, s in scores.items()])
    k = int(math.floor(sparsity * flat.numel() + 1e-9))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    out, offset = {}, 0
    for n, s in scores.items():
        out[n] = keep[offset : offset + s.numel()].view(s.shape).to(s.device)
        offset += s.numel()
    return out


def topk_keep(scores: torch.Tensor, keep_count: int, partitions: int = 1) -> torch.Tensor:
    """Keep vector of the ``keep_count`` highest groups; with partitions, the same count in each partition."""
    n = scores.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if partitions > 1:
        per = keep_count // partitions
        part = scores.view(partitions, n // partitions)
        idx = torch.topk(part, per, dim=1).indices if per else None
        kp = keep.view(partitions, n // partitions)
        if idx is not None:
            kp.scatter_(1, idx, True)
        return keep
    if keep_count:
        keep[torch.topk(scores, keep_count).indices] = True
    return keep


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
) -> list[int]:
    """Global ranking of groups across layers, each layer keeping between ``min_keep`` and ``max_keep`` of its
    groups. Scores are compared raw: use a criterion whose scale is comparable across layers.

    With ``partitions`` > 1 (query heads sharing KV heads) a layer's count moves in steps of one group per
    partition and keeps at least one per partition, as :func:`topk_keep` needs; step ``r`` of a layer scores the
    mean of its partitions' ``r``-th best groups."""
    p = max(1, partitions)
    counts = [s.numel() for s in scores]
    total_keep = sum(counts) - int(math.floor(sparsity * sum(counts) + 1e-9))
    units = [n // p for n in counts]
    total_units = total_keep // p
    lo = [int(math.ceil(min_keep * u)) for u in units]
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
        s = _exclude_pruned(s.float().cpu(), None if prev is None else prev[li])
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
