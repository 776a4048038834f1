"""Which entries go inside a comparison group: unstructured per row / layer / model, N:M, top-k groups, layers."""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def exclude_pruned(scores: torch.Tensor, prev_keep: torch.Tensor | None) -> torch.Tensor:
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
    s = exclude_pruned(scores.float(), prev_keep)
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

    return nm_mask(exclude_pruned(scores.float(), prev_keep), n, m)


def select_global_unstructured(
    scores: dict[str, torch.Tensor], sparsity: float, prev: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """One threshold over all tensors: the lowest ``floor(sparsity · N)`` scores model-wide are removed."""
    flat = torch.cat([exclude_pruned(s, prev.get(n)).flatten().cpu() for n, s in scores.items()])
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


def lowest_layers(scores: torch.Tensor, kept: torch.Tensor, fraction: float) -> set[int]:
    """Indices of the ``floor(fraction · L)`` lowest-scoring layers (``scores`` [L]); layers already removed
    (``kept`` false) score -inf, so a monotone update counts them first."""
    scores = scores.masked_fill(~kept, NEG_INF)
    n_drop = int(math.floor(fraction * len(scores) + 1e-9))
    return set(torch.topk(scores, n_drop, largest=False).indices.tolist()) if n_drop else set()


def joint_keep(
    densities: list[torch.Tensor],
    params: list[int],
    budget: int,
    prev: list[torch.Tensor | None] | None = None,
    min_keep: list[int] | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Keep vectors of several group sets that share one budget of ``budget`` parameters, and the parameters they
    remove.

    ``densities[s]``: the importance per parameter of set ``s``'s groups (comparable across the sets);
    ``params[s]``: the parameters one of its groups holds. Groups go in order of increasing density — the greedy
    answer to removing ``budget`` parameters at the least summed importance (a knapsack by value per weight) —
    each while the removed parameters stay within the budget (a group that would overshoot is passed over for
    smaller ones), every set keeping at least ``min_keep[s]`` groups (default 1). Groups already pruned
    (``prev``) go first and count. Ties: set order, then position."""
    n_sets = len(densities)
    prev = prev or [None] * n_sets
    floor = min_keep or [1] * n_sets
    keeps = [torch.ones(d.numel(), dtype=torch.bool) for d in densities]
    left = [d.numel() for d in densities]
    removed = 0
    order = []
    for s, (d, pk) in enumerate(zip(densities, prev)):
        d = exclude_pruned(d.float().cpu(), pk)
        order += [(float(v), s, g) for g, v in enumerate(d.tolist())]
    order.sort()
    for v, s, g in order:
        forced = v == NEG_INF  # already pruned: stays pruned, whatever the budget
        if not forced and (left[s] <= floor[s] or removed + params[s] > budget):
            continue
        keeps[s][g] = False
        left[s] -= 1
        removed += params[s]
    return [k.to(d.device) for k, d in zip(keeps, densities)], removed
