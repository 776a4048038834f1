"""Hooks that feed the statistics: forward pre-hooks for activations, tensor hooks (or ``.grad`` reads) for
gradients, FSDP2 included."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..distributed import RowShard, is_sharded
from ..structure import GroupSet
from .activations import ActivationStats
from .gradients import GradientStats, GradStat, GroupGradientStats


class ActivationCollector:
    """Forward pre-hooks that feed :class:`ActivationStats` for a set of Linear modules (by module name)."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        with_mean: bool = False,
        grad_enabled_only: bool = False,
        kinds: Iterable[str] = ("sum_sq",),
        samples: int = 256,
        seed: int = 0,
    ) -> None:
        """``grad_enabled_only``: count only forwards run with autograd on (training steps), not the no-grad
        forwards of validation or of a teacher sharing the weights. ``kinds``, ``samples``, ``seed``: what each
        :class:`ActivationStats` keeps besides Σx² (a criterion says which: ``criterion.collector_options()``)."""
        self.modules = modules
        self.stats = {name: ActivationStats(with_mean, kinds, samples, seed) for name in modules}
        self._handles: list = []
        self.token_mask: torch.Tensor | None = None  # set by the caller to exclude padding
        self.grad_enabled_only = grad_enabled_only

    def attach(self) -> ActivationCollector:
        self.detach()
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(self.stats[name])))
        return self

    def _hook(self, stat: ActivationStats):
        def hook(module, args) -> None:
            if self.grad_enabled_only and not torch.is_grad_enabled():
                return
            # FIX: with gradient checkpointing the layer's forward runs again inside backward (grad enabled), and
            # every token was counted twice (Σx² and the count doubled: GBLM's activation term off by √2). A forward
            # run by the autograd engine (a graph task is current) is a recomputation, not a new sample.
            if self.grad_enabled_only and torch._C._current_graph_task_id() != -1:
                return
            stat.update(args[0], self.token_mask)

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reduce(self, group=None) -> None:
        for s in self.stats.values():
            s.reduce(group)

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.stats[k].load_state_dict(v)

    def merged_state_dict(self, group=None) -> dict:
        """:meth:`state_dict` summed over ranks, on every rank. Collective."""
        return {k: self.stats[k].merged_state_dict(group) for k in sorted(self.stats)}

    def load_merged_state_dict(self, state: dict, rank: int) -> None:
        for k, v in state.items():
            self.stats[k].load_merged_state_dict(v, rank)

    def reset(self) -> None:
        for s in self.stats.values():
            s.reset()


class GradientCollector:
    """Reads ``.grad`` of chosen parameters after each per-sample backward and feeds the gradient statistics.

    ``params``: parameter name -> parameter (element statistics); ``group_sets``: structured sets whose coupled
    statistics are wanted. Call :meth:`update` once per sample, after its backward and before zeroing gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        param_names: Iterable[str] = (),
        grad_kinds: Iterable[GradStat] = ("sum_sq",),
        group_sets: Iterable[GroupSet] = (),
        group_kinds: Iterable[str] = ("coupled",),
    ) -> None:
        self.model = model
        named = dict(model.named_parameters(remove_duplicate=False))
        self.params = {n: named[n] for n in param_names}
        self.stats = {n: GradientStats(grad_kinds) for n in self.params}
        self.group_stats = {gs.key: GroupGradientStats(gs, group_kinds) for gs in group_sets}
        needed = {m.name for gs in group_sets for m in gs.members}
        self._group_params = {n: named[n] for n in needed}
        self._handles: list = []
        self._rebound: dict[str, list] = {}  # FSDP2: name -> [unsharded parameter hooked, its tensor-hook handle]
        # hook mode: factor that turns the gradient backward produced into the gradient of the sample's own loss
        # (a trainer may have divided the loss by its accumulation count or multiplied it by an fp16 loss scale)
        self.grad_scale = 1.0

    @property
    def parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter whose gradient this collector reads, by name: those of the element statistics, then the
        members of the group sets."""
        return {**self.params, **self._group_params}

    def update(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                self.stats[n].update(p.grad, p)
        if self.group_stats:
            grads = {n: p.grad for n, p in self._group_params.items()}
            missing = [n for n, g in grads.items() if g is None]
            if missing:
                raise RuntimeError(f"no gradient for {missing[:3]}: are these parameters trainable?")
            weights = {n: p.detach() for n, p in self._group_params.items()}
            for s in self.group_stats.values():
                s.update(grads, weights)

    # ---- hook mode: per-backward gradients during training
    def attach(self) -> GradientCollector:
        """Read every backward's gradient of the chosen parameters through tensor hooks, as it is produced.

        A parameter's tensor hook sees the gradient of *this* backward only, before it is added into ``.grad``:
        under gradient accumulation it is the micro-batch's gradient (not the running sum ``.grad`` holds), and
        under DDP it is the rank's local gradient (before the all-reduce), so :meth:`reduce` later sums samples
        exactly once. Call :meth:`close_sample` after each backward (one backward = one sample). Element
        statistics are updated inside the hook; group statistics keep one partial sum per group set until the
        sample is closed, so no gradient is held longer than autograd holds it.

        FSDP2 (the model holds ``fully_shard`` modules): the sharded ``DTensor`` parameters are not in the autograd
        graph; each forward uses an *unsharded* parameter that FSDP all-gathers and registers on the owning module,
        whose gradient is the rank's own full gradient until FSDP reduce-scatters it after backward. A forward
        pre-hook on the owning module puts the tensor hook on that unsharded parameter (again if FSDP replaced it),
        so the hook sees exactly what it sees without FSDP — the rank's per-micro-batch gradient of the whole
        parameter, before any cross-rank reduction. Group statistics are summed over ranks by :meth:`reduce` as
        under DDP; element statistics are reduce-scattered in the hook onto the rows of the parameter's shard
        (:class:`GradientStats` ``shard``), so every rank must run the same backwards (as FSDP itself requires).
        """
        self.detach()
        self._resolve_shards()
        handles = []
        members: dict[str, list[GroupGradientStats]] = {}
        for s in self.group_stats.values():
            for m in s.group_set.members:
                members.setdefault(m.name, []).append(s)
        sharded = is_sharded(self.model)
        for name in sorted(set(self.params) | set(members)):
            p = self.params.get(name, self._group_params.get(name))
            if not p.requires_grad:
                raise RuntimeError(f"{name} does not require grad: its gradient statistics cannot be collected")
            if sharded:
                owner, _, attr = name.rpartition(".")
                module = self.model.get_submodule(owner)
                handles.append(
                    module.register_forward_pre_hook(self._rebind(name, module, attr, members.get(name, [])))
                )
            else:
                handles.append(p.register_hook(self._hook(name, p, members.get(name, []))))
        self._handles = handles
        return self

    def _rebind(self, name: str, module: nn.Module, attr: str, group_stats: list[GroupGradientStats]):
        def pre_hook(mod, args) -> None:
            if not torch.is_grad_enabled():
                return
            p = getattr(module, attr)
            slot = self._rebound.get(name)
            if slot is not None and slot[0] is p:
                return
            if slot is not None:
                slot[1].remove()
            self._rebound[name] = [p, p.register_hook(self._hook(name, p, group_stats))]

        return pre_hook

    def _hook(self, name: str, p: torch.Tensor, group_stats: list[GroupGradientStats]):
        stat = self.stats.get(name)

        def hook(grad: torch.Tensor) -> None:
            scale = self.grad_scale  # folded into the sums: no scaled copy of the gradient is made
            if stat is not None:
                stat.update(grad, p.detach(), scale)
            for s in group_stats:
                s.add_member(name, grad, p.detach(), scale)

        return hook

    def close_sample(self) -> None:
        for s in self.group_stats.values():
            s.close_sample()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for _, h in self._rebound.values():
            h.remove()
        self._rebound = {}

    def _all(self):
        return list(self.stats.items()) + list(self.group_stats.items())

    def _resolve_shards(self) -> None:
        """Element statistics of row-sharded parameters held on the local rows (FSDP2). The model is sharded after
        this collector is built (``configure_model`` runs after the callbacks' ``setup``), so the shards are looked
        up on the parameters registered now; an unsharded parameter (inside a forward) leaves a shard as it was."""
        if not self.stats or not is_sharded(self.model):
            return
        for n, stat in self.stats.items():
            shard = RowShard.of(self.model.get_parameter(n))
            if shard is not None and shard != stat.shard:
                stat.set_shard(shard)

    def reduce(self, group=None, lazy: bool = False) -> None:
        """Sum over ranks; ``lazy``: row-sharded element statistics stay on the rows until :meth:`whole`."""
        self._resolve_shards()
        for s in self.stats.values():
            s.reduce(group, lazy=lazy)
        for s in self.group_stats.values():
            s.reduce(group)

    def gather(self, names: Iterable[str]) -> list[str]:
        """The element statistics of ``names`` that were lazily reduced (see :meth:`reduce`) made whole, until
        :meth:`reset`; returns those it gathered. Collective: every rank passes the same names (gathered sorted)."""
        return [n for n in sorted(set(names) & set(self.stats)) if self.stats[n].gather()]

    @contextmanager
    def whole(self, names: Iterable[str]) -> Iterator[None]:
        """:meth:`gather` for the block only: on exit the statistics gathered here go back to the rows, freeing
        the whole sums (an event scoring one layer at a time holds one layer's). Collective, as :meth:`gather`."""
        gathered = self.gather(names)
        try:
            yield
        finally:
            for n in gathered:
                self.stats[n].release()

    def merged_state_dict(self, group=None) -> dict:
        """:meth:`state_dict` summed over ranks, on every rank (see :meth:`Accumulator.merged_state_dict`).
        Collective."""
        self._resolve_shards()
        return {k: s.merged_state_dict(group) for k, s in self._all()}

    def load_merged_state_dict(self, state: dict, rank: int) -> None:
        self._resolve_shards()
        for k, s in self._all():
            if k in state:
                s.load_merged_state_dict(state[k], rank)

    def reset(self) -> None:
        for _, s in self._all():
            s.reset()

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self._all()}

    def load_state_dict(self, state: dict) -> None:
        self._resolve_shards()
        for k, s in self._all():
            if k in state:
                s.load_state_dict(state[k])
