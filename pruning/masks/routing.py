"""Removed experts are never chosen: the router of a mixture-of-experts layer whose experts are masked picks its top
k among the kept ones, exactly as the compacted model's router (which no longer has the removed rows) does.

Zeroing a removed expert's router row only makes its logit 0, which the top-k may still pick; so a forward hook on
the router replaces its output by the family's own routing of the logits with the removed experts' set to ``-inf``
(:func:`kept_routing`). Every supported family routes the same way (a softmax over all experts, the top k of it,
renormalised to sum 1 where the family says so); a removed expert's ``-inf`` logit is an exact 0 in that softmax,
so the kept experts get the probabilities a softmax over them alone gives: the compacted model's.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..structure import FamilySpec, GroupSet


def kept_routing(
    logits: torch.Tensor, keep: torch.Tensor, top_k: int, renormalise: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, top-k weights, top-k indices)`` of a router whose removed experts (``keep`` False) get logit
    ``-inf``: ``p = softmax(logits)`` over every expert, its ``top_k`` largest (indices in the original numbering),
    divided by their sum when ``renormalise``, as ``dtype``."""
    masked = logits.masked_fill(~keep.to(logits.device), float("-inf"))
    probs = torch.softmax(masked.float(), dim=-1)
    top, index = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        top = top / top.sum(dim=-1, keepdim=True)
    return masked, top.to(dtype), index


def router_path(gs: GroupSet) -> str:
    """The router module of an ``expert`` group set (the owner of its first member, the router weight)."""
    return gs.members[0].name.rpartition(".")[0]


def experts_path(gs: GroupSet) -> str:
    """The experts module of an ``expert`` group set (the owner of its 3-D expert weights)."""
    return gs.members[1].name.rpartition(".")[0]


def router_hook(masks, key: str, family: FamilySpec):
    """A forward hook for the router of group set ``key``: its output routed among the experts ``masks`` keeps
    (nothing changed while the masks are lifted for the teacher, or when every expert is kept)."""
    ref = weakref.ref(masks)

    def hook(module: nn.Module, args, output):
        owner = ref()
        if owner is None or owner.lifting or key not in owner.groups:
            return None
        keep = owner.groups[key]
        if bool(keep.all()):
            return None
        logits, weights, _ = output
        renormalise = bool(getattr(module, family.router_norm)) if family.router_norm else True
        return kept_routing(logits, keep, int(module.top_k), renormalise, weights.dtype)

    return hook
