"""Prune decoder-only LLMs: structure discovery, masks that hold, statistics, criteria, one-shot pruning.

The core knows torch and transformers only; the Lightning module and CLI live in their own files.
"""

from .api import GRANULARITIES, PruneResult, calibration_fingerprint, prune
from .gradients import collect_gradients, distillation_loss
from .importance import CRITERIA, Criterion, ScoreContext, get_criterion, register
from .masks import MaskSet, SparsityReport, nm_mask
from .sequential import run_layerwise
from .stats import (
    ActivationCollector,
    ActivationStats,
    GradientCollector,
    GradientStats,
    GroupGradientStats,
)
from .structure import FAMILIES, FamilySpec, GroupSet, ModelStructure, UnsupportedModelError, register_family

__all__ = [
    "CRITERIA",
    "FAMILIES",
    "GRANULARITIES",
    "ActivationCollector",
    "ActivationStats",
    "Criterion",
    "FamilySpec",
    "GradientCollector",
    "GradientStats",
    "GroupGradientStats",
    "GroupSet",
    "MaskSet",
    "ModelStructure",
    "PruneResult",
    "ScoreContext",
    "SparsityReport",
    "UnsupportedModelError",
    "calibration_fingerprint",
    "collect_gradients",
    "distillation_loss",
    "get_criterion",
    "nm_mask",
    "prune",
    "register",
    "register_family",
    "run_layerwise",
    "compact",
    "load_pretrained",
    "save_pretrained",
]
from .surgery import compact, load_pretrained, save_pretrained  # noqa: E402
