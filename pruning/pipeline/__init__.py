"""One-shot pruning as a staged pipeline: plan the targets, collect statistics, score, select, apply."""

from .layerwise import run_layerwise
from .oneshot import GRANULARITIES, PruneResult, calibration_fingerprint, prune

__all__ = ["GRANULARITIES", "PruneResult", "calibration_fingerprint", "prune", "run_layerwise"]
