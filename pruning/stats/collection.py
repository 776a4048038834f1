"""Hooks that feed the statistics: forward pre-hooks for activations, tensor hooks (or ``.grad`` reads) for
gradients, FSDP2 included."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..distributed import RowShard, is_sharded
from ..structure import GroupSet
from .activations import ActivationStats, token_squares
from .gradients import GradientStats, GradStat, GroupGradientStats
from .sequences import SequenceGradients, unsupported


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
        self._shared: tuple | None = None  # (the last input, its version, its mask, its token_squares)

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
            if "routing" in stat.kinds and len(args) >= 3:  # an experts module: (hidden, indices, weights)
                stat.update_routing(module, args, self.token_mask)
            if not stat.squares_only:
                stat.update(args[0], self.token_mask)
                return
            x, cached = args[0], self._shared
            # q/k/v (and gate/up) read one input: its Σx² is made once and added to each of them
            if cached is None or cached[0] is not x or cached[1] != x._version or cached[2] is not self.token_mask:
                cached = self._shared = (x, x._version, self.token_mask, token_squares(x, self.token_mask))
            stat.add_squares(*cached[3])

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._shared = None

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
    """Feeds the gradient statistics of chosen parameters, per sample (one sequence), three ways:

    - :meth:`attach` (default ``batched``): per-sequence statistics from batched backwards, through
      :class:`~pruning.stats.SequenceGradients` on the Linears; around each micro-batch :meth:`begin_batch` (before
      its forward) and :meth:`end_batch` (after its backward). Parameters it cannot serve (:meth:`unbatchable`:
      embeddings, tied heads) are read by tensor hooks, which need micro-batches of one sequence;
    - :meth:`attach` with ``batched=False``: tensor hooks only, one sample per backward whatever its size;
    - :meth:`update`: reads ``.grad`` after a backward of one sample (or, for ``sum`` only, of several).

    ``params``: parameter name -> parameter (element statistics); ``group_sets``: structured sets whose coupled
    statistics are wanted.
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
        self._sequences: SequenceGradients | None = None  # batched per-sequence statistics while attached
        self._hooked_groups: list[GroupGradientStats] = []  # group statistics fed by tensor hooks while attached
        self._single: dict[str, str] = {}  # attached batched: what tensor hooks read, per sample = per backward
        self._grad_scale = 1.0
        # batched: return the weights' gradients to autograd (False: nobody trains on them; zeros are returned)
        self.weight_grads = True

    @property
    def grad_scale(self) -> float:
        """Factor that turns the gradient backward produced into that of the samples' own losses (a trainer may
        have divided the loss by its accumulation count or multiplied it by an fp16 loss scale)."""
        return self._grad_scale

    @grad_scale.setter
    def grad_scale(self, value: float) -> None:
        self._grad_scale = value
        if self._sequences is not None:
            self._sequences.batch.grad_scale = value

    @property
    def sums_only(self) -> bool:
        """Only ``Σ_n g_n`` is wanted (Taylor): a batched backward's ``.grad`` gives it, no per-sequence work."""
        return not self.group_stats and all(set(s.kinds) == {"sum"} for s in self.stats.values())

    def unbatchable(self) -> dict[str, str]:
        """The parameters whose per-sequence statistics a batched backward cannot give, with the reason (anything
        but the weight or bias of a plain ``nn.Linear`` of its own); they need one backward per sequence."""
        members = [[m.name for m in s.group_set.members] for s in self.group_stats.values()]
        return unsupported(self.model, self.params, members)

    @property
    def parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter whose gradient this collector reads, by name: those of the element statistics, then the
        members of the group sets."""
        return {**self.params, **self._group_params}

    def update(self, samples: int = 1, live: dict[str, torch.Tensor] | None = None) -> None:
        """Read ``.grad`` after a backward of one sample; ``samples`` > 1: a backward of the summed losses of that
        many samples, which gives ``sum`` statistics only (:attr:`sums_only`). ``live``: read only these element
        parameters, by name, as they are now (a layer materialised from disk holds new ones; default: every one the
        collector was built with)."""
        if samples != 1 and not self.sums_only:
            raise ValueError(
                f"a backward of {samples} samples' summed losses gives sum statistics only. HINT: attach() the "
                "collector for per-sequence statistics from batched backwards"
            )
        if live is not None and self.group_stats:
            raise ValueError("update(live=...) reads element statistics only: group statistics need every member")
        read = self.params if live is None else {n: p for n, p in live.items() if n in self.params}
        for n, p in read.items():
            if p.grad is not None:
                self.stats[n].update(p.grad, p, samples=samples)
        if self.group_stats:
            grads = {n: p.grad for n, p in self._group_params.items()}
            missing = [n for n, g in grads.items() if g is None]
            if missing:
                raise RuntimeError(f"no gradient for {missing[:3]}: are these parameters trainable?")
            weights = {n: p.detach() for n, p in self._group_params.items()}
            for s in self.group_stats.values():
                s.update(grads, weights)

    # ---- attached: statistics of every backward during training (or of a calibration pass)
    def attach(self, batched: bool = True) -> GradientCollector:
        """Collect the statistics of every backward until :meth:`detach`.

        ``batched``: per-sequence statistics from micro-batches of any size: the Linears' per-sequence gradients
        are made inside their backward (:class:`~pruning.stats.SequenceGradients`); :meth:`begin_batch`'s
        ``scales`` turn the loss's gradient into each sequence's own (default 1 each: the loss is the sum of the
        sequences' own losses; :func:`~pruning.stats.token_mean_scales` for a mean over the batch's tokens).
        Parameters it cannot serve (:meth:`unbatchable`) are read by tensor hooks, one sample per backward
        (micro-batches of one sequence). ``batched=False``: tensor hooks for everything; a micro-batch is one sample,
        whatever its size.

        A parameter's tensor hook sees the gradient of *this* backward only, before it is added into ``.grad``, and
        so does the per-sequence function: under gradient accumulation it is the micro-batch's gradient (not the
        running sum ``.grad`` holds), and under DDP it is the rank's local gradient (before the all-reduce), so
        :meth:`reduce` later sums samples exactly once. Call :meth:`end_batch` after each backward.

        FSDP2 (the model holds ``fully_shard`` modules): the sharded ``DTensor`` parameters are not in the autograd
        graph; each forward uses an *unsharded* parameter that FSDP all-gathers and registers on the owning module,
        whose gradient is the rank's own full gradient until FSDP reduce-scatters it after backward. The
        per-sequence function reads the parameter registered at its forward (the unsharded one); a tensor hook is
        put on that unsharded parameter by a forward pre-hook on the owning module (again if FSDP replaced it). So
        both see exactly what they see without FSDP. Group statistics are summed over ranks by :meth:`reduce` as
        under DDP; element statistics are reduce-scattered once per backward onto the rows of the parameter's shard
        (:class:`GradientStats` ``shard``), so every rank must run the same backwards (as FSDP itself requires).
        """
        self.detach()
        self._resolve_shards()
        single = self.unbatchable() if batched else dict.fromkeys(self.parameters, "batched=False")
        hooked_groups = [s for s in self.group_stats.values() if any(m.name in single for m in s.group_set.members)]
        self._hooked_groups = hooked_groups
        self._single = single if batched else {}
        if batched:
            element = {n: s for n, s in self.stats.items() if n not in single}
            groups = [s for s in self.group_stats.values() if s not in hooked_groups]
            if element or groups:
                self._sequences = SequenceGradients(self.model, element, groups).attach()
                self._sequences.weight_grads = self.weight_grads
                self._sequences.batch.grad_scale = self._grad_scale
        hooked = {n for n in self.params if n in single}
        hooked |= {m.name for s in hooked_groups for m in s.group_set.members}
        self._handles = self._tensor_hooks(sorted(hooked), hooked_groups)
        return self

    def _tensor_hooks(self, names: list[str], group_stats: list[GroupGradientStats]) -> list:
        """Tensor hooks (FSDP2: on the unsharded parameters) that feed the element statistics of ``names`` and the
        members of ``group_stats``."""
        handles = []
        members: dict[str, list[GroupGradientStats]] = {}
        for s in group_stats:
            for m in s.group_set.members:
                members.setdefault(m.name, []).append(s)
        sharded = is_sharded(self.model)
        for name in names:
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
        return handles

    def begin_batch(
        self, sequences: int, token_mask: torch.Tensor | None = None, scales: Iterable[float] | None = None
    ) -> None:
        """The next forward (attached) holds ``sequences`` rows: ``token_mask`` ``[sequences, positions]`` (0:
        padding, left out) and per-sequence ``scales`` that turn the loss's gradient into each sequence's own
        (:func:`~pruning.stats.token_mean_scales` for a loss averaged over the batch's tokens; default 1 each)."""
        if self._single and sequences != 1:
            name, why = next(iter(self._single.items()))
            raise ValueError(
                f"per-sequence gradient statistics of {sorted(self._single)[:3]} ({name}: {why}) need micro-batches "
                f"of one sequence; this one has {sequences}. HINT: set the data's batch_size: 1 (with "
                "accumulate_grad_batches for bigger optimiser batches), or treat a micro-batch as one sample "
                "(ImportanceCallback per_sample: micro_batch)"
            )
        if self._sequences is not None:
            self._sequences.begin_batch(sequences, token_mask, scales)

    def end_batch(self) -> None:
        """After the micro-batch's backward: its per-sequence sums are closed (a group set with a member that got
        no gradient is summed over those that did), and so is the tensor hooks' sample."""
        if self._sequences is not None:
            self._sequences.end_batch()
        for s in self._hooked_groups:
            s.close_sample()

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
        served = self._sequences is not None and name not in self._single  # its element statistics: batched
        stat = None if served else self.stats.get(name)

        def hook(grad: torch.Tensor) -> None:
            scale = self.grad_scale  # folded into the sums: no scaled copy of the gradient is made
            if stat is not None:
                stat.update(grad, p.detach(), scale)
            for s in group_stats:
                s.add_member(name, grad, p.detach(), scale)

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for _, h in self._rebound.values():
            h.remove()
        self._rebound = {}
        if self._sequences is not None:
            self._sequences.detach()
            self._sequences = None
        self._hooked_groups, self._single = [], {}

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
