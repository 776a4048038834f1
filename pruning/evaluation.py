"""Held-out perplexity: ``exp(mean next-token NLL)`` over the given windows (no overlap, no BOS added)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .gradients import next_token_ce


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str | None = None) -> float:
    """Token-weighted perplexity of ``model`` on ``[batch, seq]`` token-id tensors (each window scored alone)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        nll += float(next_token_ce(logits, ids, reduction="sum"))
        tokens += ids.shape[0] * (ids.shape[1] - 1)
    model.train(was)
    return math.exp(nll / tokens)
