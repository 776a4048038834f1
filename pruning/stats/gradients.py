"""Statistics of per-sample gradients: per weight (:class:`GradientStats`, row-sharded under FSDP2) and per group
of coupled weights (:class:`GroupGradientStats`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..distributed import RowShard, RowSums
from ..structure import GroupSet
from .accumulators import Accumulator, summed_count

GradStat = str  # "sum" | "sum_sq" | "sum_abs" | "sum_abs_gw"
GRAD_STATS = ("sum", "sum_sq", "sum_abs", "sum_abs_gw")
GROUP_STATS = ("coupled", "vector")


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
    def update(
        self, grad: torch.Tensor, weight: torch.Tensor | None = None, scale: float = 1.0, samples: int = 1
    ) -> None:
        """One sample's gradient. ``scale`` (> 0) multiplies the gradient first, without a copy of it (undoing a loss
        division). ``samples`` > 1: ``grad`` is the *sum* of that many samples' gradients (a batched backward's
        ``.grad``), which gives ``sum`` and nothing else."""
        if samples != 1 and set(self.kinds) != {"sum"}:
            raise ValueError(
                f"a gradient summed over {samples} samples gives the statistic 'sum' only, not {self.kinds}. "
                "HINT: feed per-sample gradients (pruning.stats.SequenceGradients computes them from one backward)"
            )
        dest = self.open_batch(grad.shape, grad.device)
        self.add_sequence(dest, grad, weight, scale)
        self.close_batch(dest, samples)

    # ---- a batch of samples: open, add each sample's terms, close (one reduce-scatter per batch when row-sharded)
    def open_batch(self, shape: torch.Size, device: torch.device) -> dict[str, torch.Tensor]:
        """Where the per-sample terms of one batch go: the running sums themselves, or (row-sharded) whole-size
        zeros that :meth:`close_batch` reduce-scatters onto this rank's rows."""
        self.sharding.settle(self.sums)
        if self.shard is not None:
            return {k: torch.zeros(shape, dtype=torch.float32, device=device) for k in self.kinds}
        return {k: self._buf(k, shape, device) for k in self.kinds}

    def add_sequence(
        self, dest: dict[str, torch.Tensor], grad: torch.Tensor, weight: torch.Tensor | None, scale: float = 1.0
    ) -> None:
        """Add one sample's terms (g, g², |g|, |g⊙w|, its gradient times ``scale``) into ``dest`` (from
        :meth:`open_batch`). Without autograd (a backward, ``torch.no_grad``): it is called per sample."""
        g = grad.float()
        for k, buf in dest.items():
            if k == "sum":
                buf.add_(g, alpha=scale)
            elif k == "sum_sq":
                buf.addcmul_(g, g, value=scale * scale)
            elif k == "sum_abs":
                buf.add_(g.abs(), alpha=scale)
            else:
                buf.add_(torch.mul(g, weight).abs_(), alpha=scale)

    def add_sequences(
        self, dest: dict[str, torch.Tensor], grads: torch.Tensor, weight: torch.Tensor | None, factors: list[float]
    ) -> None:
        """:meth:`add_sequence` for several samples, ``grads`` ``[n, *shape]``, one factor each (a loop: an
        in-place pass per sample over cached sums beats a matrix-vector product over a squared copy on CPU)."""
        for g, f in zip(grads, factors):
            self.add_sequence(dest, g, weight, f)

    def close_batch(self, dest: dict[str, torch.Tensor], samples: int) -> None:
        """Count the batch's ``samples``; row-sharded, the batch's terms (this rank's own, whole) are summed over the
        ranks onto this rank's rows. Collective when row-sharded: every rank closes the same batches."""
        if self.shard is not None:
            for k, term in dest.items():
                rows = self._buf(k, self.sharding.row_shape(term.shape), term.device)
                self.sharding.scatter_add(rows, term)
        self.count += samples

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
        self.count = summed_count(self.count, group)

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
        count = self.count if self.sharding.lazy else summed_count(self.count, group)  # lazily reduced: summed
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
                gw = m.aligned(grads[m.name].float() * weights[m.name].float(), n)
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
                gw = m.per_group(gw, n).sum(1)
                total = gw if total is None else total + gw
            self._buf("vector", n, total.device).add_(total.abs())
        self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return dict(self.sums, count=torch.tensor(self.count))

    @torch.no_grad()
    def add_sums(self, sums: dict[str, torch.Tensor], samples: int) -> None:
        """Add statistics already summed over ``samples`` samples (one value per group and kind), e.g. a batch's from
        :class:`~pruning.stats.SequenceGradients`."""
        for k, v in sums.items():
            self._buf(k, self.group_set.count, v.device).add_(v)
        self.count += samples

    # ---- member by member (tensor hooks during training: each gradient is seen once, then freed)
    @torch.no_grad()
    def add_member(self, name: str, grad: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> None:
        """Add one member's ``g⊙w`` of the current sample to the open partial sums; :meth:`close_sample` ends it.

        Once every member is in, the partial sums go into the statistics at once and are freed: a backward then
        holds one layer's partial sums (``[groups, hidden]`` fp32 for MLP neurons, the size of one member), not one
        per layer until it ends."""
        gs = self.group_set
        n = gs.count
        gw = grad.float() * weight.float()
        if scale != 1.0:
            gw.mul_(scale)
        for m in gs.members:  # several when the weight is fused (each its slice); one member at a time
            if m.name != name:
                continue
            if "coupled" in self.kinds and weight.dim() == 2:
                aligned = m.aligned(gw, n)  # [groups, hidden]; a transposed view for column members (down_proj)
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
                total = m.per_group(gw, n).sum(1)
                if "vector" in self._parts:
                    self._parts["vector"].add_(total)
                else:
                    self._parts["vector"] = total
        self._added.add(name)
        if len(self._added) == len({m.name for m in gs.members}):
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
