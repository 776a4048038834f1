"""Applying masks in place and keeping them applied through training.

:meth:`Holding.attach` masks gradients (a tensor hook; an optimiser pre-step hook for FSDP2's sharded parameters,
whose reduce-scattered ``.grad`` never passes a tensor hook) and re-zeroes the weights and the optimiser state at
pruned positions after every step of any optimiser (a global post-step hook), on the local shards when sharded.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..distributed import is_dtensor, local
from ..structure import family_of, named_parameters
from .lifted import Originals
from .routing import mask_router, router_path


def _module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``, also under a wrapper that prefixes the names (PEFT's ``base_model.model.``)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        found = [m for n, m in model.named_modules() if n.endswith("." + path)]
        if len(found) != 1:
            raise
        return found[0]


class Holding(Originals):
    """Keep masks applied in place to a model's parameters, and held there by hooks once attached."""

    def __init__(self) -> None:
        super().__init__()
        self._handles: list = []
        self._by_id: dict[int, str] = {}
        self._params: dict[str, nn.Parameter] = {}  # the attached model's masked parameters
        self._routers: dict[int, object] = {}  # id(router module) -> its forward-hook handle (removed experts)

    def resolve(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters of ``model`` the masks name, by name (sorted); ``KeyError`` if one is missing."""
        params = named_parameters(model)
        missing = [n for n in self.names() if n not in params]
        if missing:
            raise KeyError(f"masks name parameters the model does not have: {missing[:5]}")
        # sorted: applying to sharded parameters gathers some (the stash), a collective every rank runs in one order
        return {n: params[n] for n in sorted(self.names())}

    @torch.no_grad()
    def apply(self, model: nn.Module, keep_original: bool = False, only: Iterable[str] | None = None) -> None:
        """Zero the pruned weights in place (of the parameters named in ``only``, default all). With
        ``keep_original`` the values being zeroed are stashed (on CPU) so that :meth:`lifted` can run the original
        model with the same parameters (the distillation teacher)."""
        params = self.resolve(model)
        if only is not None:
            only = set(only)
            params = {n: p for n, p in params.items() if n in only}
        for name, p in params.items():
            if keep_original:
                self._stash_original(name, p)
            for f in self._local_factors(name, p):
                local(p).mul_(f)
        self._mask_routers(model, only)
        if self.attached:
            self._params = self.resolve(model)

    def _mask_routers(self, model: nn.Module, only: set[str] | None = None) -> None:
        """A forward hook on the router of every ``expert`` group set that removes experts (of the routers named in
        ``only``, default all), so that the removed experts are never chosen (:mod:`.routing`); it stays until
        :meth:`release_routers` (:func:`~pruning.compact` removes the experts themselves)."""
        for key, gs in self.group_sets.items():
            if gs.kind != "expert" or bool(self.groups[key].all()):
                continue
            if only is not None and gs.members[0].name not in only:
                continue
            router = _module(model, router_path(gs))
            handle = mask_router(router, self.groups[key], family_of(model))
            if handle is not None:
                self._routers[id(router)] = handle

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickling) holds no router hooks: those belong to the model they were put on."""
        state = self.__dict__.copy()
        state["_routers"] = {}
        return state

    def release_routers(self) -> None:
        """Remove the router hooks that keep removed experts from being chosen."""
        for handle in self._routers.values():
            handle.remove()
        self._routers = {}

    @torch.no_grad()
    def reapply(self) -> None:
        """Re-zero pruned weights of the attached model (after a LoRA merge, a load, a foreign optimiser)."""
        for name, p in self._params.items():
            for f in self._local_factors(name, p):
                local(p).mul_(f)

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` holds the masks on a model (gradient and optimiser hooks in place)."""
        return bool(self._handles)

    def attach(self, model: nn.Module) -> Holding:
        """Keep the masks applied through training: mask gradients and re-zero after every optimiser step."""
        self.detach()
        self.apply(model)
        self._params = self.resolve(model)
        self._cut_to_rows(self._params)
        self._by_id = {id(p): n for n, p in self._params.items()}
        sharded = False
        for name, p in self._params.items():
            if is_dtensor(p):
                sharded = True  # FSDP2: the sharded parameter is not in the graph; see _before_step
            elif p.requires_grad:
                self._handles.append(p.register_hook(self._grad_hook(name)))
        ref = weakref.ref(self)

        def post_step(optimizer, args, kwargs):
            masks = ref()
            if masks is not None:
                masks._after_step(optimizer)

        self._handles.append(register_optimizer_step_post_hook(post_step))
        if sharded:

            def pre_step(optimizer, args, kwargs):
                masks = ref()
                if masks is not None:
                    masks._before_step(optimizer)

            self._handles.append(register_optimizer_step_pre_hook(pre_step))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _grad_hook(self, name: str):
        ref = weakref.ref(self)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            masks = ref()
            if masks is None:
                return grad
            for f in masks.factors(name, grad):
                grad = grad * f
            return grad

        return hook

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Mask the (reduce-scattered) gradients of sharded parameters on their local shards."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = self._by_id.get(id(p))
                if name is None or p.grad is None or not is_dtensor(p):
                    continue
                for f in self._local_factors(name, p):
                    local(p.grad).mul_(f)

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = self._by_id.get(id(p))
                if name is None:
                    continue
                state = optimizer.state.get(p, {})
                for f in self._local_factors(name, p):
                    local(p).mul_(f)
                    for v in state.values():
                        if torch.is_tensor(v) and v.shape == p.shape:
                            local(v).mul_(f)
