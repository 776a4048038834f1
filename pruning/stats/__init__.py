"""Statistics that criteria turn into scores, kept apart from the criteria.

Each accumulator has ``update / compute / reset / state_dict / load_state_dict / reduce``. Everything is a *sum*
(plus a count) held in fp32 whatever the model dtype, so that a data-parallel ``reduce`` (all-reduce SUM of sums
and counts) over ranks gives exactly the statistics of one process that saw all the samples, and a checkpoint
resumes them. "A sample" for gradient statistics is one sequence: a batched backward gives every sequence's
gradient of a Linear from the layer's input and output gradient (:mod:`.sequences`), or the caller runs backward
once per sequence and calls ``update`` after each.

Under FSDP2 the per-weight gradient statistics (:class:`GradientStats`) of a row-sharded parameter are held on the
parameter's local rows only (:class:`~pruning.distributed.RowShard`): each per-sample term is computed from the
rank's own full gradient, and a backward's terms are reduce-scattered into the rank's rows of the running sum.
Group statistics (one value per group) and activation statistics (one per input feature) stay whole on every rank.

Modules: :mod:`.accumulators` (the shared sums-plus-count machinery), :mod:`.activations` (per input feature),
:mod:`.gradients` (per weight and per group), :mod:`.sequences` (per-sequence gradients of Linears from a batched
backward), :mod:`.collection` (the hooks that feed them).
"""

from .accumulators import Accumulator
from .activations import ACT_STATS, ActivationSamples, ActivationStats
from .collection import ActivationCollector, GradientCollector
from .gradients import GRAD_STATS, GROUP_STATS, GradientStats, GradStat, GroupGradientStats
from .sequences import SequenceGradients, token_mean_scales

__all__ = [
    "ACT_STATS",
    "GRAD_STATS",
    "GROUP_STATS",
    "Accumulator",
    "ActivationCollector",
    "ActivationSamples",
    "ActivationStats",
    "GradStat",
    "GradientCollector",
    "GradientStats",
    "GroupGradientStats",
    "SequenceGradients",
    "token_mean_scales",
]
