"""Statistics that criteria turn into scores, kept apart from the criteria.

Each accumulator has ``update / compute / reset / state_dict / load_state_dict / reduce``. Everything is a *sum*
(plus a count) held in fp32 whatever the model dtype, so that a data-parallel ``reduce`` (all-reduce SUM of sums
and counts) over ranks gives exactly the statistics of one process that saw all the samples, and a checkpoint
resumes them. "A sample" for gradient statistics is one sequence: the caller runs backward once per sequence
(micro-batches of one) and calls ``update`` after each.

Under FSDP2 the per-weight gradient statistics (:class:`GradientStats`) of a row-sharded parameter are held on the
parameter's local rows only (:class:`~pruning.distributed.RowShard`): each per-sample term is computed from the
rank's own full gradient and reduce-scattered into the rank's rows of the running sum. Group statistics (one value
per group) and activation statistics (one per input feature) stay whole on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import RowShard, RowSums, is_sharded
from ..structure import GroupSet

GradStat = str  # "sum" | "sum_sq" | "sum_abs" | "sum_abs_gw"
GRAD_STATS = ("sum", "sum_sq", "sum_abs", "sum_abs_gw")
GROUP_STATS = ("coupled", "vector")
ACT_STATS = ("sum_sq", "gram", "samples")


class Accumulator:
    """Named fp32 sum tensors plus a count; the shared machinery of every statistic."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def reset(self) -> None:
        for t in self.sums.values():
            t.zero_()
        self.count = 0

    def state_dict(self) -> dict:
        return {"sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["sums"].items():
            if k in self.sums:
                self.sums[k].copy_(v)
            else:
                self.sums[k] = v.clone().float()
        self.count = int(state["count"])

    def reduce(self, group=None) -> None:
        """All-reduce (SUM) sums and counts over data-parallel ranks; a no-op without torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for t in self.sums.values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        self.count = _summed_count(self.count, group)

    def merged_state_dict(self, group=None) -> dict:
        """The state one process that saw every rank's samples would hold (sums and count over ranks), on every
        rank, leaving this accumulator as it is. Collective (every rank calls it, in the same order)."""
        state = self.state_dict()
        if not (dist.is_available() and dist.is_initialized()):
            return state
        dev = _comm_device(group)
        sums = {}
        for k in sorted(state["sums"]):
            t = state["sums"][k].to(dev, copy=True)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            sums[k] = t.cpu()
        return dict(state, sums=sums, count=_summed_count(self.count, group))

    def load_merged_state_dict(self, state: dict, rank: int) -> None:
        """Load :meth:`merged_state_dict` on one of several ranks: rank 0 keeps the sums and the count, the others
        start from zero, so the next :meth:`reduce` counts every sample once."""
        self.load_state_dict(state)
        if rank:
            for t in self.sums.values():
                t.zero_()
            self.count = 0

    def _buf(self, key: str, shape, device) -> torch.Tensor:
        t = self.sums.get(key)
        if t is None:
            t = self.sums[key] = torch.zeros(shape, dtype=torch.float32, device=device)
        elif t.device != torch.device(device):  # restored from a checkpoint onto the host
            t = self.sums[key] = t.to(device)
        return t


def _summed_count(count: int, group=None) -> int:
    c = torch.tensor([float(count)], dtype=torch.float64, device=_comm_device(group))
    dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
    return int(c.item())


def _comm_device(group=None) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class ActivationStats(Accumulator):
    """Statistics of one Linear's input per input feature: Σx² (and Σx when ``with_mean``), over tokens.

    ``compute()`` returns ``sum_sq`` (Σ_t x², Wanda's squared column norm ‖X_j‖²), ``count`` (tokens) and, with
    ``with_mean``, the per-feature ``mean`` and ``var``.

    ``kinds`` adds statistics some criteria need (``sum_sq`` is always kept):

    - ``gram``: ``Σ_t x_t x_tᵀ`` ([in, in], fp32), the Gram matrix SparseGPT's Hessian ``H = 2XXᵀ`` is made of;
      a sum like the others, so ``reduce`` and checkpoints treat it the same way;
    - ``samples``: a seeded uniform subsample of ``samples`` token rows ([m, in], see :class:`ActivationSamples`),
      the per-sample activations the mutual-information criterion compares.
    """

    def __init__(
        self, with_mean: bool = False, kinds: Iterable[str] = ("sum_sq",), samples: int = 256, seed: int = 0
    ) -> None:
        super().__init__()
        self.with_mean = with_mean
        self.kinds = tuple(dict.fromkeys(("sum_sq", *kinds)))
        bad = set(self.kinds) - set(ACT_STATS)
        if bad:
            raise ValueError(f"activation statistics {sorted(bad)} unknown; choose from {ACT_STATS}")
        self.reservoir = ActivationSamples(samples, seed) if "samples" in self.kinds else None

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``x``: [..., in_features]; ``mask`` (optional, [...]): which tokens count (padding excluded)."""
        x = x.reshape(-1, x.shape[-1]).float()
        if mask is not None:
            x = x[mask.reshape(-1).to(x.device).bool()]
        self._buf("sum_sq", x.shape[-1], x.device).add_(x.square().sum(0))
        if self.with_mean:
            self._buf("sum", x.shape[-1], x.device).add_(x.sum(0))
        if "gram" in self.kinds:
            self._buf("gram", (x.shape[-1], x.shape[-1]), x.device).addmm_(x.T, x)
        if self.reservoir is not None:
            self.reservoir.update(x)
        self.count += x.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"sum_sq": self.sums["sum_sq"], "count": torch.tensor(self.count)}
        if self.with_mean and self.count:
            mean = self.sums["sum"] / self.count
            out["mean"] = mean
            out["var"] = (self.sums["sum_sq"] / self.count - mean * mean).clamp_min(0)
        if "gram" in self.sums:
            out["gram"] = self.sums["gram"]
        if self.reservoir is not None:
            out["samples"] = self.reservoir.compute()
        return out

    def sample_rows(self) -> torch.Tensor:
        """The subsampled token rows [m, in] (``kinds`` must include ``samples``)."""
        if self.reservoir is None:
            raise KeyError("no per-sample activations: build the statistics with kinds=('samples',)")
        return self.reservoir.compute()

    def reset(self) -> None:
        super().reset()
        if self.reservoir is not None:
            self.reservoir.reset()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.reservoir is not None:
            state["samples"] = self.reservoir.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.reservoir is not None and "samples" in state:
            self.reservoir.load_state_dict(state["samples"])

    def reduce(self, group=None) -> None:
        super().reduce(group)
        if self.reservoir is not None:
            self.reservoir.reduce(group)

    def load_merged_state_dict(self, state: dict, rank: int) -> None:
        super().load_merged_state_dict(state, rank)
        if rank and self.reservoir is not None:  # rank 0 keeps the saved rows: the others' would repeat them
            self.reservoir.reset()


class ActivationSamples:
    """A uniform random subsample, without replacement, of ``size`` of the rows (tokens) seen, reproducible by seed.

    Every row gets a random key from a seeded generator and the ``size`` rows with the smallest keys are kept
    (bottom-k sampling): a uniform subset of everything seen, in O(size) memory, whatever the number of batches.
    Two statistics built with the same seed and fed the same token stream keep the same token positions, so the
    layers of one model are compared on the same tokens. ``reduce()`` all-gathers the ranks' rows and keys and keeps
    the ``size`` smallest keys (each rank draws its keys from ``seed`` and its rank), i.e. a uniform subsample of
    all ranks' rows. Not a sum, so not an :class:`Accumulator`, but the same verbs.
    """

    def __init__(self, size: int = 256, seed: int = 0) -> None:
        if size < 2:
            raise ValueError(f"samples={size} must be >= 2")
        self.size = size
        self.seed = seed
        self.rows: torch.Tensor | None = None  # [size, d] fp32, sorted by key; unfilled slots have key +inf
        self.keys: torch.Tensor | None = None  # [size] fp64
        self.seen = 0
        self._gen: torch.Generator | None = None

    def _generator(self) -> torch.Generator:
        if self._gen is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._gen = torch.Generator().manual_seed(self.seed + 1_000_003 * rank)
        return self._gen

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        keys = torch.rand(x.shape[0], generator=self._generator(), dtype=torch.float64).to(x.device)
        if self.rows is None:
            self.rows = torch.zeros(self.size, x.shape[-1], dtype=torch.float32, device=x.device)
            self.keys = torch.full((self.size,), float("inf"), dtype=torch.float64, device=x.device)
        self.seen += x.shape[0]
        # only the new rows among the batch's own bottom-k can enter the kept set
        k = min(self.size, x.shape[0])
        new_keys, idx = torch.topk(keys, k, largest=False)
        self._merge(new_keys, x[idx])

    def _merge(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        all_keys = torch.cat([self.keys, keys.to(self.keys.device)])
        all_rows = torch.cat([self.rows, rows.to(self.rows.device)])
        best, idx = torch.topk(all_keys, self.size, largest=False)  # sorted ascending
        self.keys, self.rows = best, all_rows[idx]

    def compute(self) -> torch.Tensor:
        """The kept rows, [min(size, seen), d]."""
        if self.rows is None:
            raise RuntimeError("no activations were recorded")
        return self.rows[torch.isfinite(self.keys)]

    def reset(self) -> None:
        self.rows = self.keys = None
        self.seen = 0
        self._gen = None

    def state_dict(self) -> dict:
        return {
            "rows": None if self.rows is None else self.rows.detach().cpu().clone(),
            "keys": None if self.keys is None else self.keys.detach().cpu().clone(),
            "seen": self.seen,
            "generator": None if self._gen is None else self._gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        dev = self.rows.device if self.rows is not None else torch.device("cpu")
        self.rows = None if state["rows"] is None else state["rows"].to(dev)
        self.keys = None if state["keys"] is None else state["keys"].to(dev)
        self.seen = int(state["seen"])
        self._gen = None
        if state.get("generator") is not None:
            self._gen = torch.Generator()
            self._gen.set_state(state["generator"])

    def reduce(self, group=None) -> None:
        """All-gather the ranks' rows and keys, keep the ``size`` smallest keys; a no-op without torch.distributed.

        Collective for every rank, also one that holds fewer rows or none (it saw fewer tokens, or restarted from a
        checkpoint that rank 0 keeps): row counts and widths are exchanged first and the rows padded to the longest
        (padding keys are +inf, never kept)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        dev = _comm_device(group)
        n = 0 if self.rows is None else int(self.rows.shape[0])
        width = 0 if self.rows is None else int(self.rows.shape[1])
        meta = torch.tensor([n, width], dtype=torch.int64, device=dev)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        n_max, width = max(int(m[0]) for m in metas), max(int(m[1]) for m in metas)
        seen = torch.tensor([float(self.seen)], dtype=torch.float64, device=dev)
        dist.all_reduce(seen, op=dist.ReduceOp.SUM, group=group)
        self.seen = int(seen.item())
        if n_max == 0:
            return
        home = self.rows.device if self.rows is not None else torch.device("cpu")
        dtype = self.rows.dtype if self.rows is not None else torch.float32
        my_keys = torch.full((n_max,), float("inf"), dtype=torch.float64, device=dev)
        my_rows = torch.zeros((n_max, width), dtype=torch.float32, device=dev)
        if n:
            my_keys[:n] = self.keys.to(dev, torch.float64)
            my_rows[:n] = self.rows.to(dev, torch.float32)
        keys = [torch.empty_like(my_keys) for _ in range(world)]
        rows = [torch.empty_like(my_rows) for _ in range(world)]
        dist.all_gather(keys, my_keys, group=group)
        dist.all_gather(rows, my_rows, group=group)
        all_keys, all_rows = torch.cat(keys), torch.cat(rows)
        best, idx = torch.topk(all_keys, min(self.size, all_keys.numel()), largest=False)  # +inf: empty slots
        key_dtype = self.keys.dtype if self.keys is not None else torch.float64
        self.keys, self.rows = best.to(home, key_dtype), all_rows[idx].to(home, dtype)


class GradientStats(Accumulator):
    """Per-weight statistics of per-sample gradients ``g_n``: Σg, Σg², Σ|g|, Σ|g⊙w| (any subset).

    ``shard`` (FSDP2, set by :meth:`set_shard`): the sums are held on the parameter's local rows only. Each
    :meth:`update` (every rank at once: a collective) still gets the rank's own full per-sample gradient, computes
    the full per-sample term (g², |g|, ...) and reduce-scatters it, so the running sums hold *every* rank's samples
    on this rank's rows; :meth:`reduce` then all-gathers the rows into the whole sums the criteria read (and sums
    the counts), and :meth:`reset` drops back to the rows. Whole sums given to :meth:`load_state_dict` are cut to the
    rows. ``reduce(lazy=True)`` sums the counts only and keeps the rows: :meth:`gather` makes the sums whole when
    they are read and :meth:`release` drops them back to the rows, so an event that scores one layer at a time holds
    one layer's whole statistics, not the whole model's. Where the sums are is :attr:`sharding`
    (:class:`~pruning.distributed.RowSums`).
    """

    def __init__(self, kinds: Iterable[GradStat] = ("sum_sq",)) -> None:
        super().__init__()
        self.kinds = tuple(kinds)
        bad = set(self.kinds) - set(GRAD_STATS)
        if bad:
            raise ValueError(f"gradient statistics {sorted(bad)} unknown; choose from {GRAD_STATS}")
        self.sharding = RowSums()

    @property
    def shard(self) -> RowShard | None:
        """The rows of the parameter this rank holds the sums on (``None``: whole)."""
        return self.sharding.shard

    def set_shard(self, shard: RowShard | None) -> None:
        """Hold the sums on ``shard``'s rows from now on (whole sums already held are cut to them)."""
        self.sharding.set_shard(shard, self.sums)

    @torch.no_grad()
    def update(self, grad: torch.Tensor, weight: torch.Tensor | None = None, scale: float = 1.0) -> None:
        """``scale`` (> 0) multiplies the gradient first, without a copy of it (undoing a loss division)."""
        self.sharding.settle(self.sums)
        g = grad.float()
        if self.shard is not None:  # the full per-sample term, summed over ranks onto this rank's rows
            for k in self.kinds:
                rows = self._buf(k, self.sharding.row_shape(g.shape), g.device)
                self.sharding.scatter_add(rows, _term(k, g, weight, scale))
            self.count += 1
            return
        for k in self.kinds:
            buf = self._buf(k, g.shape, g.device)
            if k == "sum":
                buf.add_(g, alpha=scale)
            elif k == "sum_sq":
                buf.addcmul_(g, g, value=scale * scale)
            elif k == "sum_abs":
                buf.add_(g.abs(), alpha=scale)
            else:
                buf.add_((g * weight.float()).abs(), alpha=scale)
        self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return dict(self.sums, count=torch.tensor(self.count))

    def reduce(self, group=None, lazy: bool = False) -> None:
        """Sum over ranks. Row-sharded: the counts are summed and the rows gathered whole, or with ``lazy`` kept
        on the rows until :meth:`gather` (an unsharded statistic is all-reduced either way)."""
        self.sharding.settle(self.sums)
        if self.shard is None:
            return super().reduce(group)
        # the rows already hold every rank's samples (reduce-scattered per sample): gather them, sum the counts
        self.sums = self.sharding.reduced(self.sums, lazy)
        self.count = _summed_count(self.count, group)

    @property
    def on_rows(self) -> bool:
        """Reduced with ``lazy=True`` and not gathered: the sums are this rank's rows of the reduced statistics."""
        return self.sharding.phase == "lazy"

    def gather(self) -> bool:
        """The lazily reduced rows gathered into the whole sums (until :meth:`release`); whether it gathered
        (``False``: already whole, or not lazily reduced). Collective: every rank gathers the same statistics in the
        same order."""
        whole = self.sharding.gather(self.sums)
        if whole is None:
            return False
        self.sums = whole
        return True

    def release(self) -> None:
        """Back to the rows after :meth:`gather` (the whole sums are freed); no communication."""
        self.sums = self.sharding.release(self.sums)

    def reset(self) -> None:
        self.sharding.reset()
        if self.shard is not None:  # buffers of the rows are made again by the next update
            self.sums = {}
            self.count = 0
            return
        super().reset()

    def state_dict(self) -> dict:
        return dict(super().state_dict(), rows_sharded=self.shard is not None and not self.sharding.whole)

    def load_state_dict(self, state: dict) -> None:
        state = {k: v for k, v in state.items() if k != "rows_sharded"}
        for k, v in state["sums"].items():  # whole sums in place of rows (or the reverse): new buffers
            if k in self.sums and self.sums[k].shape != v.shape:
                del self.sums[k]
        super().load_state_dict(state)
        self.sharding.loaded()
        self.sharding.localize(self.sums)

    def merged_state_dict(self, group=None) -> dict:
        self.sharding.settle(self.sums)
        if self.shard is None or self.sharding.phase == "whole":
            return super().merged_state_dict(group)
        sums = self.sharding.whole_copy(self.sums)
        count = self.count if self.sharding.lazy else _summed_count(self.count, group)  # lazily reduced: summed
        return {"sums": sums, "count": count, "rows_sharded": True}

    def load_merged_state_dict(self, state: dict, rank: int) -> None:
        # merged sums are whole and hold every rank's samples, whether the saving run was row-sharded or not. Row-
        # sharded now: each rank keeps its rows of them (cut when the shard is known); unsharded: rank 0 keeps them
        # and the others start from zero (decided in RowSums.settle, as the shard may not be known yet). Rank 0
        # alone keeps the count.
        self.load_state_dict(state)
        if rank:
            self.count = 0
            self.sharding.loaded_merged(rank)


def _term(kind: GradStat, g: torch.Tensor, weight: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The per-sample term of one statistic, a new tensor (to be reduce-scattered onto a rank's rows)."""
    if kind == "sum":
        return g * scale
    if kind == "sum_sq":
        return g.square().mul_(scale * scale)
    if kind == "sum_abs":
        return g.abs().mul_(scale)
    return (g * weight.float()).abs_().mul_(scale)


def _aligned(t: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    """[count, other] view of a 2-D member: sum over the group's own rows/columns, keep the other axis."""
    t = t.movedim(dim, 0) if dim else t
    if t.shape[0] == count:  # one row per group (MLP neurons): nothing to sum, no copy
        return t
    return t.reshape(count, -1, t.shape[-1]).sum(1)


class GroupGradientStats(Accumulator):
    """Per-sample statistics of the coupled weights of a :class:`GroupSet`.

    - ``coupled`` (SDMPrune): ``Σ_n mean_j | Σ_members g_n⊙w [group, j] |``. Each 2-D member is aligned on its
      hidden-size axis (gate/up rows ``[i, j]`` and down columns ``[j, i]`` for an MLP neuron; q/k/v rows and o
      columns for a KV group, summed over the group's own rows first). The sum over the coupled weights comes
      *before* the absolute value, as in the paper; since ``mean_j`` is linear and the outer sum is over samples,
      accumulating the per-sample row means gives exactly ``mean_j Σ_n |s_n[i, j]|``. Biases are left out.
    - ``vector`` (LLM-Pruner / SAAP vector-wise): ``Σ_n | Σ_{all weights of the group} g_n⊙w |``.
    """

    def __init__(self, group_set: GroupSet, kinds: Iterable[str] = ("coupled",)) -> None:
        super().__init__()
        self.group_set = group_set
        self.kinds = tuple(kinds)
        self._parts: dict[str, torch.Tensor] = {}  # the open sample's partial sums (hook mode)
        self._added: set[str] = set()  # members in the open partial sums
        self._closed = False  # the open sample's sums are already in the statistics (every member was added)
        bad = set(self.kinds) - set(GROUP_STATS)
        if bad:
            raise ValueError(f"group statistics {sorted(bad)} unknown; choose from {GROUP_STATS}")

    @torch.no_grad()
    def update(self, grads: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
        gs = self.group_set
        n = gs.count
        if "coupled" in self.kinds:
            acc = None
            for m in gs.members:
                if weights[m.name].dim() != 2:
                    continue
                gw = _aligned(grads[m.name].float() * weights[m.name].float(), m.dim, n)
                if acc is not None and acc.shape != gw.shape:
                    raise ValueError(
                        f"'coupled' statistics need members aligned on one axis; {m.name} gives {tuple(gw.shape)}"
                        f" but earlier members gave {tuple(acc.shape)} (use 'vector' for {gs.kind} groups)"
                    )
                acc = gw if acc is None else acc + gw
            self._buf("coupled", n, acc.device).add_(acc.abs().mean(1))
        if "vector" in self.kinds:
            total = None
            for m in gs.members:
                gw = grads[m.name].float() * weights[m.name].float()
                gw = (gw.movedim(m.dim, 0) if m.dim else gw).reshape(n, -1).sum(1)
                total = gw if total is None else total + gw
            self._buf("vector", n, total.device).add_(total.abs())
        self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return dict(self.sums, count=torch.tensor(self.count))

    # ---- member by member (tensor hooks during training: each gradient is seen once, then freed)
    @torch.no_grad()
    def add_member(self, name: str, grad: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> None:
        """Add one member's ``g⊙w`` of the current sample to the open partial sums; :meth:`close_sample` ends it.

        Once every member is in, the partial sums go into the statistics at once and are freed: a backward then
        holds one layer's partial sums (``[groups, hidden]`` fp32 for MLP neurons, the size of one member), not one
        per layer until it ends."""
        gs = self.group_set
        n = gs.count
        m = next(m for m in gs.members if m.name == name)
        gw = grad.float() * weight.float()
        if scale != 1.0:
            gw.mul_(scale)
        if "coupled" in self.kinds and weight.dim() == 2:
            aligned = _aligned(gw, m.dim, n)  # [groups, hidden]; a transposed view for column members (down_proj)
            # row and column members are summed apart, each in its own contiguous layout, and joined once at the
            # flush: adding a transposed tensor is a strided pass over memory (a few ms per MLP layer, cold), and
            # the cheap direction is into the [groups, hidden] sum
            key, part = (
                ("coupled", aligned)
                if aligned.is_contiguous() or not aligned.T.is_contiguous()
                else ("coupled_t", aligned.T)
            )
            if key in self._parts:
                self._parts[key].add_(part)
            else:
                self._parts[key] = part.contiguous()
        if "vector" in self.kinds:
            total = (gw.movedim(m.dim, 0) if m.dim else gw).reshape(n, -1).sum(1)
            if "vector" in self._parts:
                self._parts["vector"].add_(total)
            else:
                self._parts["vector"] = total
        self._added.add(name)
        if len(self._added) == len(gs.members):
            self._flush()
            self._closed = True

    def _flush(self) -> None:
        """The open partial sums into the statistics (abs after the coupled sum)."""
        parts = self._parts
        if "coupled" in parts or "coupled_t" in parts:
            rows, cols = parts.get("coupled"), parts.get("coupled_t")
            total = cols.T if rows is None else rows if cols is None else rows.add_(cols.T)
            per_group = total.abs().mean(1)
            self._buf("coupled", self.group_set.count, per_group.device).add_(per_group)
        if "vector" in parts:
            self._buf("vector", self.group_set.count, parts["vector"].device).add_(parts["vector"].abs())
        self._parts = {}
        self._added = set()

    @torch.no_grad()
    def close_sample(self) -> None:
        """End the sample: partial sums still open (a member without a gradient) go into the statistics; the sample
        is counted if any member was added."""
        if not (self._parts or self._closed):
            return
        self._flush()
        self._closed = False
        self.count += 1


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
