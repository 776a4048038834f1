"""Masks: how they are stored, applied and kept applied.

A :class:`MaskSet` holds *keep* masks (True = kept) by parameter name, in two forms:

- element masks, the full shape of the parameter (unstructured and N:M pruning);
- group keep-vectors, one per :class:`~pruning.structure.GroupSet` (neurons, heads, layers), stored as the
  vector and applied as a broadcastable row or column factor, so structured masks cost O(groups) memory.

Applying a mask zeroes the weights **in place**: the parameter tensors keep their storage, so optimisers, hooks and
DDP buckets keep pointing at the same memory (the rule torch.ao's ``FakeSparsity`` states for its buffer). Once
:meth:`MaskSet.attach` is called, pruned weights stay exactly zero: gradients are masked by a tensor hook, and a
global optimiser post-step hook re-zeroes the weights and the optimiser state (momentum, second moments) at pruned
positions after every step of any optimiser, so AdamW's weight decay and a momentum that predates the mask cannot
revive them. Masks are monotone (a pruned weight stays pruned) unless ``monotone=False`` is passed.

Sharded parameters (FSDP2 ``DTensor``s, sharded by rows): masks are built whole (element masks at the parameter's
global shape, group keep-vectors as they are) and applied to the rows each rank stores, in place on the local shard
(:func:`pruning.distributed.local_part`). Once attached to a sharded model, the element mask of every row-sharded
parameter is held as this rank's rows only (:class:`~pruning.distributed.RowShard`), so training holds 1/world of
them; what needs a mask whole (:meth:`MaskSet.keep_mask`, :meth:`MaskSet.factors`, the next event's monotone
selection, the checkpointed state, the lifted teacher's stash) gathers the rows, a collective every rank runs in the
same order, and counts are summed over the ranks. :meth:`MaskSet.sharded_mask` gives a mask as a ``DTensor`` with the
parameter's placements. The re-zeroing after every optimiser step works on the local shards of the weights and
of the optimiser state; gradients of sharded parameters are masked by an optimiser pre-step hook (FSDP2 writes the
reduce-scattered ``.grad`` directly, so a tensor hook on the sharded parameter never fires).

One class, one module per responsibility, each layer built on the one below:

- :mod:`.storage` (:class:`KeepMasks`): building and storing the masks, their factors, counts, rows, state;
- :mod:`.lifted` (:class:`Originals`): the stash of original values and the ``lifted`` teacher;
- :mod:`.holding` (:class:`Holding`): applying in place, attach/detach, gradient and optimiser hooks, reapply;
- :mod:`.routing`: the router hook that keeps removed experts from being chosen (installed by ``apply``);
- :mod:`.report` (:class:`Reporting`, :class:`SparsityReport`): how much the masks prune.
"""

from __future__ import annotations

import torch

from .holding import Holding
from .report import Counts, Reporting, SparsityReport
from .storage import nm_mask

__all__ = ["Counts", "MaskSet", "SparsityReport", "nm_mask"]


class MaskSet(Holding, Reporting):
    """Keep masks for a model's parameters, applied in place and kept applied. See the module docstring."""

    def reset_to(self, element: dict[str, torch.Tensor]) -> None:
        """Replace every mask by the whole element masks ``element`` (the masks of a model after surgery): no group
        masks, no stash of original values, no parameter bindings (attach again to hold them)."""
        self.release_routers()
        self.element = dict(element)
        self.groups, self.group_sets, self._stash = {}, {}, {}
        self._params, self._by_id, self._rows = {}, {}, {}
