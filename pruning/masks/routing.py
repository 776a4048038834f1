"""Removed experts are never chosen: the router of a mixture-of-experts layer whose experts are masked picks its top
k among the kept ones, exactly as the compacted model's router (which no longer has the removed rows) does.

Zeroing a removed expert's router row only makes its logit 0, which the top-k may still pick; so a forward hook on
the router replaces its output by the family's own routing of the logits with the removed experts' set to ``-inf``
(:func:`kept_routing`). Every supported family routes the same way (a softmax over all experts, the top k of it,
renormalised to sum 1 where the family says so); a removed expert's ``-inf`` logit is an exact 0 in that softmax,
so the kept experts get the probabilities a softmax over them alone gives: the compacted model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


KEEP = "pruning_expert_keep"  # on a masked router: bool [experts], False = removed
NORM = "pruning_router_norm"  # the router's attribute that says whether top-k weights are renormalised
LIFTED = "pruning_experts_lifted"  # True while the masks are lifted for the teacher: every expert routable


def route_among_kept(module: nn.Module, args, output):
    """Forward hook of a router whose experts are masked: its output routed among the experts it keeps.

    The state is the router's own (attributes :data:`KEEP`, :data:`NORM`, :data:`LIFTED`), so the hook holds for as
    long as the model does, whatever happens to the mask set that put it there, and a copy of the model keeps its
    own; nothing changes while the masks are lifted or when every expert is kept."""
    keep = getattr(module, KEEP, None)
    if keep is None or getattr(module, LIFTED, False) or bool(keep.all()):
        return None
    logits, weights, _ = output
    norm = getattr(module, NORM, None)
    renormalise = bool(getattr(module, norm)) if norm else True
    return kept_routing(logits, keep, int(module.top_k), renormalise, weights.dtype)


def mask_router(router: nn.Module, keep: torch.Tensor, family: FamilySpec):
    """Route ``router`` among the experts ``keep`` holds from now on; the new hook's handle, or ``None`` when the
    router had one already (its kept experts updated)."""
    setattr(router, KEEP, keep.detach().to(torch.bool).clone())
    setattr(router, NORM, family.router_norm)
    if any(fn is route_among_kept for fn in router._forward_hooks.values()):
        return None
    return router.register_forward_hook(route_among_kept)


def masked_routers(model: nn.Module) -> list[str]:
    """Names of the routers of ``model`` that route around removed experts (a hook and experts not kept)."""
    return [
        n
        for n, m in model.named_modules()
        if getattr(m, KEEP, None) is not None
        and not bool(getattr(m, KEEP).all())
        and any(fn is route_among_kept for fn in m._forward_hooks.values())
    ]


def unmask_routers(model: nn.Module) -> None:
    """Every router of ``model`` routes among all its experts again (hooks and their state removed; what
    :func:`~pruning.compact` does once the removed experts are gone)."""
    for m in model.modules():
        if not hasattr(m, KEEP):
            continue
        for hid, fn in list(m._forward_hooks.items()):
            if fn is route_among_kept:
                del m._forward_hooks[hid]
        for attr in (KEEP, NORM, LIFTED):
            if hasattr(m, attr):
                delattr(m, attr)


@contextmanager
def experts_lifted(model: nn.Module) -> Iterator[None]:
    """Every masked router of ``model`` routes among all its experts inside the block (the lifted teacher)."""
    routers = [m for m in model.modules() if hasattr(m, KEEP)]
    for m in routers:
        setattr(m, LIFTED, True)
    try:
        yield
    finally:
        for m in routers:
            setattr(m, LIFTED, False)
