"""Pruning as a staged pipeline: plan the targets, collect statistics, score, select, apply.

- :mod:`.targets`: what is targeted; :mod:`.pruner`: the stages of one event (:class:`Pruner`);
- :mod:`.calibration`: the calibration data, its record, the per-sequence gradient pass;
- :mod:`.drive`: how the stages are driven (whole model at once, layer by layer, one pass);
- :mod:`.oneshot`: :func:`prune`, the one-shot API; :mod:`.event`: an event during training (callbacks);
- :mod:`.layerwise`: running calibration data through one decoder layer at a time.
"""

from .calibration import calibration_fingerprint, collect_gradients
from .drive import prune_from_statistics
from .event import event_collectors, prune_event, scores_one_layer_at_a_time
from .layerwise import run_layerwise
from .oneshot import prune
from .pruner import Pruner, PruneResult

__all__ = [
    "Pruner",
    "PruneResult",
    "calibration_fingerprint",
    "collect_gradients",
    "event_collectors",
    "prune",
    "prune_event",
    "prune_from_statistics",
    "run_layerwise",
    "scores_one_layer_at_a_time",
]
