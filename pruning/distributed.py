"""FSDP2 / DTensor helpers: what the masks, the statistics and the callbacks need to work on sharded parameters.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what Lightning's ``ModelParallelStrategy`` runs) every parameter
of a sharded module is a ``DTensor`` sharded by rows (``Shard(0)``) over the data-parallel mesh; each rank stores
its rows only (``p.to_local()``). During a module's forward and backward FSDP all-gathers the rows into a plain,
*unsharded* parameter registered on the module in place of the sharded one, and after backward it reduce-scatters
that parameter's gradient into the sharded ``.grad``.

- :func:`local_part` cuts a full tensor (a mask, a broadcastable keep factor) down to the rows a rank stores, so a
  mask is applied in place on the local shard; :func:`shard_like` turns a full mask into a ``DTensor`` with the
  parameter's placements.
- :func:`unsharded` all-gathers every FSDP module of a model for the duration of a block (the pruning event scores
  the full weights: the same code and the same numbers as a single process); writes into the unsharded parameters
  are *not* written back (FSDP2 frees them on reshard), so callers apply masks to the shards afterwards.
  :func:`unsharded_module` does the same for one module (a decoder layer), for scoring one layer at a time.
- :func:`full_state_dict` gathers the full, unsharded state (on CPU) for export.
- :class:`DropGradients` drops the gradients of scoring steps that freeze the weights before FSDP reduce-scatters
  them (the statistics have read them already).
- :class:`RowShard` is a rank's rows of a sharded parameter, for statistics of that parameter's size that each rank
  keeps on its own rows only (reduce-scatter in, all-gather out); :class:`RowSums` is where such a statistic's sums
  are (rows, whole, lazily reduced, gathered) and the moves between the places.
- :func:`comm_device` is where tensors go for a collective of a process group; :func:`broadcast_parameters` puts one
  rank's values of unsharded parameters on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.4
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - old torch: nothing is ever sharded
    FSDPModule = ()  # type: ignore[assignment,misc]
    DTensor = ()  # type: ignore[assignment,misc]


def is_dtensor(t) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` was applied to (the root last, as ``named_modules`` lists it first)."""
    if not FSDPModule:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model)) or any(is_dtensor(p) for p in model.parameters())


def comm_device(group=None) -> torch.device:
    """The device a collective of ``group`` (default: the world) runs on: the current CUDA device under NCCL, else
    the host (gloo)."""
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def broadcast_parameters(model: nn.Module, names: Iterable[str], src: int = 0) -> None:
    """Rank ``src``'s values of the named parameters of ``model`` on every rank (after SparseGPT rewrote the kept
    weights on each rank). Collective; a no-op without a process group of more than one rank. Not for sharded
    parameters: each row of a shard has one owner already."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = dict(model.named_parameters())
    names = sorted(names)
    sharded = [k for k in names if is_dtensor(params[k])]
    if sharded:
        raise ValueError(
            f"broadcast_parameters got sharded parameters {sharded[:3]}; it takes unsharded ones only. HINT: a "
            "sharded parameter's rows have one owner each, nothing to broadcast"
        )
    device = comm_device()
    for k in names:
        p = params[k]
        t = p.data.to(device)
        dist.broadcast(t, src=src)
        p.data.copy_(t)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a ``DTensor`` (a view of its storage: in-place writes land in the parameter), or the
    tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (``like``'s global shape, or broadcastable to it with size-1 dims) that lives in this
    rank's shard of ``like``, on the shard's device. ``like`` not a ``DTensor``: ``full`` on ``like``'s device."""
    if not is_dtensor(like):
        return full.to(like.device)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    out = full
    for d, (n, o) in enumerate(zip(shape, offset)):
        if d < out.dim() and out.shape[d] != 1 and n != like.shape[d]:
            out = out.narrow(d, o, n)
    return out.to(like.to_local().device)


def local_rows(like: torch.Tensor) -> tuple[int, int]:
    """``(first row, row count)`` of this rank's shard of ``like`` along dim 0 (all rows when not sharded)."""
    if not is_dtensor(like):
        return 0, like.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return offset[0], shape[0]


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (e.g. a boolean keep mask of ``like``'s global shape) as a ``DTensor`` with ``like``'s mesh and
    placements, built from the local rows (no communication); a plain tensor when ``like`` is not sharded."""
    if not is_dtensor(like):
        return full.to(like.device)
    return from_local_like(local_part(full.expand(like.shape), like).contiguous(), like)


def from_local_like(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``part`` (this rank's rows of a tensor of ``like``'s global shape) as a ``DTensor`` with ``like``'s mesh and
    placements (no communication)."""
    return DTensor.from_local(
        part, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


@dataclass(frozen=True)
class RowShard:
    """This rank's rows ``[offset, offset + rows)`` of a tensor of ``total`` rows sharded by rows over ``group`` the
    way FSDP2 shards a parameter (``Shard(0)``, ``torch.chunk``: ``ceil(total / world)`` rows per rank, the last
    ranks' chunks shorter or empty), so that a statistic of the parameter's shape lives on the same rows as the
    parameter's shard."""

    group: object  # torch.distributed ProcessGroup
    world: int
    rank: int
    offset: int
    rows: int
    total: int

    @classmethod
    def of(cls, like: torch.Tensor) -> RowShard | None:
        """The rows of ``like`` (a ``DTensor`` sharded on dim 0 over a 1-D mesh of more than one rank) this rank
        stores; ``None`` for anything else (a plain tensor, a replicated or 1-rank ``DTensor``)."""
        if not is_dtensor(like) or like.device_mesh.ndim != 1 or like.device_mesh.size() == 1:
            return None
        placement = like.placements[0]
        if not (placement.is_shard() and placement.dim == 0):
            return None
        offset, rows = local_rows(like)
        group = like.device_mesh.get_group()
        return cls(group, like.device_mesh.size(), dist.get_rank(group), offset, rows, like.shape[0])

    @property
    def chunk(self) -> int:
        return -(-self.total // self.world)

    def _padded(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        if t.shape[0] == rows:
            return t.contiguous()
        return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])

    def scatter_sum(self, full: torch.Tensor) -> torch.Tensor:
        """``Σ_ranks full`` (each rank passes its own tensor of ``total`` rows), this rank's rows only: one
        reduce-scatter, so no rank ever holds the sum of the whole tensor. Collective."""
        out = full.new_empty((self.chunk, *full.shape[1:]))
        dist.reduce_scatter_tensor(out, self._padded(full, self.chunk * self.world), group=self.group)
        return out[: self.rows]

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The whole tensor (``total`` rows) from every rank's rows ``part``: one all-gather. Collective."""
        out = part.new_empty((self.chunk * self.world, *part.shape[1:]))
        dist.all_gather_into_tensor(out, self._padded(part, self.chunk), group=self.group)
        return out[: self.total]

    def narrow(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole tensor (a copy, so the whole one can be freed)."""
        return full.narrow(0, self.offset, self.rows).clone()


Sums = dict[str, torch.Tensor]


class RowSums:
    """Where the running sums of a statistic of one parameter are, when the parameter may be row-sharded (FSDP2),
    and the moves between the places. The sums (name -> tensor) stay the statistic's: a method takes them and
    returns them moved (or moves them in place, as it says).

    Unsharded (``shard`` is ``None``) the sums are whole and nothing moves. Row-sharded, each rank holds its rows of
    every sum, in one of four phases:

    - ``"rows"``: accumulating; each per-sample term is reduce-scattered onto the rows (:meth:`scatter_add`);
    - ``"whole"``: reduced (:meth:`reduced`), the rows gathered into the whole sums the criteria read;
    - ``"lazy"``: reduced with ``lazy``: the sums still on the rows until they are read;
    - ``"gathered"``: lazily reduced and gathered whole (:meth:`gather`), the rows kept apart until
      :meth:`release` drops the whole sums and goes back to them (``"lazy"``).

    :meth:`reset` starts over on the rows. A merged checkpoint (every rank's samples, whole) loaded on a rank > 0
    before the model is sharded leaves the decision to :meth:`settle`: kept (cut to the rows) if the parameter turns
    out row-sharded, dropped if it does not (rank 0's copy counts them once)."""

    def __init__(self) -> None:
        self.shard: RowShard | None = None
        self.phase: Literal["rows", "whole", "lazy", "gathered"] = "rows"
        self._kept: Sums = {}  # the rows while gathered
        self._merged_elsewhere = False  # merged sums loaded on a rank > 0, the shard not known yet

    @property
    def whole(self) -> bool:
        """Row-sharded sums gathered whole (until :meth:`reset`, or :meth:`release` after :meth:`gather`)."""
        return self.phase in ("whole", "gathered")

    @property
    def lazy(self) -> bool:
        """Reduced with ``lazy``: the counts are summed, the sums are whole only between gather and release."""
        return self.phase in ("lazy", "gathered")

    def set_shard(self, shard: RowShard | None, sums: Sums) -> None:
        """Hold ``sums`` on ``shard``'s rows from now on (whole sums in ``sums`` are cut to them, in place)."""
        self.shard = shard
        if shard is not None:
            self._merged_elsewhere = False  # the rows of merged sums are this rank's share: kept
        self.localize(sums)

    def localize(self, sums: Sums) -> None:
        """Whole sums in ``sums`` (from a checkpoint) cut to this rank's rows, in place; nothing unless sharded and
        on the rows."""
        sh = self.shard
        if sh is None or self.whole:
            return
        for k, t in list(sums.items()):
            if t.shape[0] == sh.total and sh.rows != sh.total:
                sums[k] = sh.narrow(t)

    def loaded_merged(self, rank: int) -> None:
        """Merged sums were just loaded on ``rank``: a rank > 0 keeps them only if the parameter is row-sharded
        (see :meth:`settle`)."""
        self._merged_elsewhere = bool(rank) and self.shard is None

    def settle(self, sums: Sums) -> None:
        """Unsharded after all (DDP, or a checkpoint of a sharded run resumed unsharded): merged sums a rank > 0
        loaded are rank 0's to count, so this rank starts from zero (in place)."""
        if self.shard is None and self._merged_elsewhere:
            for t in sums.values():
                t.zero_()
            self._merged_elsewhere = False

    def row_shape(self, shape: torch.Size) -> tuple[int, ...]:
        """The shape of this rank's rows of a sum of ``shape``."""
        return (self.shard.rows, *shape[1:])

    def scatter_add(self, rows: torch.Tensor, term: torch.Tensor) -> None:
        """Add the per-sample ``term`` (whole, this rank's own), summed over the ranks, onto this rank's ``rows``.
        Collective: every rank adds its own term at once."""
        rows.add_(self.shard.scatter_sum(term))

    def reduced(self, sums: Sums, lazy: bool) -> Sums:
        """The sums after the reduction (the rows already hold every rank's samples): gathered whole, or with
        ``lazy`` left on the rows until :meth:`gather`. Collective unless ``lazy``."""
        if self.phase != "rows":
            raise RuntimeError("statistics already reduced: reset() them before the next window")
        if lazy:
            self.phase = "lazy"
            return sums
        self.phase = "whole"
        return self._gathered(sums)

    def gather(self, sums: Sums) -> Sums | None:
        """The lazily reduced rows ``sums`` gathered whole, the rows kept for :meth:`release`; ``None`` (nothing
        gathered) unless lazily reduced and on the rows. Collective."""
        if self.phase != "lazy":
            return None
        self._kept = sums
        self.phase = "gathered"
        return self._gathered(sums)

    def release(self, sums: Sums) -> Sums:
        """The rows again after :meth:`gather` (the whole ``sums`` are dropped), else ``sums``; no communication."""
        if self.phase != "gathered":
            return sums
        rows, self._kept = self._kept, {}
        self.phase = "lazy"
        return rows

    def whole_copy(self, sums: Sums) -> Sums:
        """The whole sums on the host, gathered from the rows (the ones kept apart when gathered), leaving ``sums``
        as they are. Collective."""
        rows = self._kept if self.phase == "gathered" else sums
        return {k: v.cpu() for k, v in self._gathered(rows).items()}

    def reset(self) -> None:
        """Back to accumulating on the rows (the caller drops the sums)."""
        self.phase = "rows"
        self._kept = {}
        self._merged_elsewhere = False

    def loaded(self) -> None:
        """Sums were just loaded (on the rows, or whole to be localized): accumulating on the rows."""
        self.phase = "rows"
        self._kept = {}

    def _gathered(self, rows: Sums) -> Sums:
        dev = comm_device(self.shard.group)
        return {k: self.shard.gather(rows[k].to(dev)) for k in sorted(rows)}


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """All FSDP modules of ``model`` unsharded (full parameters registered on the modules) inside the block; resharded
    on exit. Writes into the unsharded parameters are discarded on exit. A no-op for an unsharded model."""
    mods = fsdp_modules(model)
    try:
        for m in mods:
            m.unshard()
        yield
    finally:
        for m in mods:
            m.reshard()


@contextmanager
def unsharded_module(module: nn.Module) -> Iterator[None]:
    """One FSDP module's own parameters unsharded inside the block (not its FSDP children: a decoder layer, or the
    root's embeddings, final norm and LM head); resharded on exit, writes discarded. A no-op for other modules."""
    if not (FSDPModule and isinstance(module, FSDPModule)):
        yield
        return
    try:
        module.unshard()
        yield
    finally:
        module.reshard()


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


class DropGradients:
    """While attached, every gradient accumulated into the *unsharded* parameters FSDP2 gathers for a backward is
    dropped as soon as it is accumulated: FSDP then finds no gradient to reduce-scatter, so no reduce-scatter runs
    and no sharded ``.grad`` is made. For steps whose update is thrown away anyway (scoring windows that freeze the
    weights): tensor hooks registered with ``register_hook`` (the statistics) have seen the gradient before it is
    accumulated. A forward pre-hook on every FSDP module of ``model`` (it runs after FSDP's own, which unshards) puts
    a post-accumulate-grad hook on each unsharded parameter once. A no-op for a model without FSDP modules."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list = []
        self._hooked: dict[int, tuple[torch.Tensor, object]] = {}

    def attach(self) -> DropGradients:
        self.detach()
        for m in fsdp_modules(self.model):
            self._handles.append(m.register_forward_pre_hook(self._pre_forward))
        return self

    def _pre_forward(self, module: nn.Module, args) -> None:
        if not torch.is_grad_enabled():
            return
        for p in module.parameters():
            if p.requires_grad and not is_dtensor(p) and id(p) not in self._hooked:
                self._hooked[id(p)] = (p, p.register_post_accumulate_grad_hook(_drop_grad))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        for _, h in self._hooked.values():
            h.remove()
        self._handles, self._hooked = [], {}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model, on CPU, on rank 0 (empty elsewhere). Collective: every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@torch.no_grad()
def load_shards(
    model: nn.Module,
    read_rows: Callable[[str, int, int], torch.Tensor] | None,
    full: nn.Module | None = None,
    known: dict[str, torch.Tensor] | None = None,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Every rank's rows of the parameters of ``model``, sharded while on the ``meta`` device (FSDP2 ``fully_shard``
    of a model built without weights): its storage made (``to_empty``, the buffers kept), then each parameter's local
    rows read by ``read_rows(name, first, count)`` (a checkpoint's memory-mapped slices: no rank reads more than its
    rows), or, with ``read_rows=None``, broadcast one parameter at a time from rank 0's whole model ``full`` (a random
    initialisation made there; ``None`` on the other ranks). ``known``: whole values every rank has already (LoRA
    adapters' seeded start), cut to the rows, no reading or communication; ``rename``: the name a parameter has in
    the source (checkpoint or ``full``), default its own. Collective in the broadcast form."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    device = comm_device() if dist.is_initialized() else torch.device("cpu")
    model.to_empty(device=device)
    for name, b in buffers.items():  # made from the config (rotary tables): to_empty left them undefined
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, b.to(device))
    sources = dict(full.named_parameters()) if full is not None else {}
    known = known or {}
    for name, p in sorted(model.named_parameters()):
        first, count = local_rows(p) if is_dtensor(p) else (0, p.shape[0])
        src = rename(name) if rename is not None else name
        if name in known:
            rows = known[name][first : first + count]
        elif read_rows is not None:
            rows = read_rows(src, first, count)
        elif not dist.is_initialized():
            rows = sources[src].detach()
        else:
            whole = (
                sources[src].detach().to(device)
                if src in sources
                else torch.empty(p.shape, dtype=p.dtype, device=device)
            )
            dist.broadcast(whole, src=0)
            rows = whole[first : first + count]
        local(p).copy_(rows.to(local(p).dtype))


def shard_model(model: nn.Module, layers, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each decoder layer of ``layers``, then the root, over the 1-D data-parallel ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


@torch.no_grad()
def drop_placeholder_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """Remove the optimiser state that ``torch.distributed.checkpoint`` invents for an optimiser that never stepped.

    FIX: saving (and loading) a sharded checkpoint goes through ``get_optimizer_state_dict``, which, when the
    optimiser has no state yet, runs one ``step()`` with zero gradients and lr 0 to create it (``_init_optim_state``):
    AdamW then holds ``step=1`` with zero moments. Scoring windows freeze the weights (no real step), so a checkpoint
    taken before recovery left this placeholder in the live optimiser and in the checkpoint, and the first real
    update after it used step 2's bias correction (0.74·lr instead of lr per weight on a sign-like first step): the
    run that saved a checkpoint, and the run resumed from it, diverged from an uninterrupted one. A state is a
    placeholder when *every* parameter's state has ``step == 1`` and all-zero tensors (a real step of an exactly zero
    gradient for every parameter); it is dropped, leaving the optimiser as it was. Returns whether it dropped."""
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"] if p in optimizer.state]
    if not states:
        return False
    for st in states:
        step = st.get("step")
        if step is None or float(local(step) if torch.is_tensor(step) else step) != 1.0:
            return False
        for k, v in st.items():
            if k != "step" and torch.is_tensor(v) and local(v).count_nonzero() != 0:
                return False
    optimizer.state.clear()
    return True
