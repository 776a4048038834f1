"""Routing statistics of a mixture-of-experts layer, taken at its experts module's input ``(hidden, top-k expert
indices, top-k routing weights)``: how many tokens each expert got, and REAP's router-weighted norms of its
outputs on them (each expert's output computed by the experts module itself, for the tokens routed to it)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def routing_sums(
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Per expert ``e`` of one batch: ``routed`` = |X_e| (tokens whose top-k holds ``e``), ``gate`` = Σ_{X_e} g_e(x)
    and ``reap`` = Σ_{X_e} g_e(x)·‖f_e(x)‖₂, with ``g_e(x)`` the routing weight the layer multiplies ``f_e(x)`` by.
    ``mask`` (``[tokens]`` or the batch's shape, 0 = padding) leaves tokens out. ``experts`` is called once per
    routed-to expert with every weight 1 (its own forward: no layout of expert weights is assumed here)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    k = index.shape[-1]
    idx, gate = index.reshape(-1, k), weights.reshape(-1, k).float()
    if mask is not None:
        keep = mask.reshape(-1).bool().to(x.device)
        x, idx, gate = x[keep], idx[keep], gate[keep]
    n = int(getattr(experts, "num_experts", int(idx.max()) + 1 if idx.numel() else 0))
    out = {name: torch.zeros(n, dtype=torch.float32, device=x.device) for name in ("routed", "gate", "reap")}
    for e in idx.unique().tolist():
        if not 0 <= e < n:
            continue
        rows, slot = (idx == e).nonzero(as_tuple=True)
        one = torch.full((len(rows), 1), e, dtype=idx.dtype, device=idx.device)
        f = experts(x[rows], one, torch.ones(len(rows), 1, dtype=weights.dtype, device=x.device))
        g = gate[rows, slot]
        out["routed"][e] = len(rows)
        out["gate"][e] = g.sum()
        out["reap"][e] = (g * torch.linalg.vector_norm(f.float(), dim=-1)).sum()
    return out
