"""Prune decoder-only LLMs: structure discovery, masks that hold, statistics, criteria, one-shot pruning.

The core knows torch and transformers only and never imports lightning; the Lightning-facing module and CLI live in
``pruning.lightning``, the callbacks in ``pruning.callbacks``, the DataModule in ``pruning.datamodules``.
"""

from .importance import CRITERIA, Criterion, ScoreContext, get_criterion, register
from .losses import distillation_loss
from .masks import MaskSet, SparsityReport, nm_mask
from .options import GRANULARITIES, Granularity, PruneOptions, SelectionOptions
from .pipeline import Pruner, PruneResult, calibration_fingerprint, collect_gradients, prune, run_layerwise
from .recipe import Recipe, prune_recipe
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
    "Granularity",
    "GroupGradientStats",
    "GroupSet",
    "MaskSet",
    "ModelStructure",
    "PruneOptions",
    "PruneResult",
    "Pruner",
    "Recipe",
    "SelectionOptions",
    "ScoreContext",
    "SparsityReport",
    "UnsupportedModelError",
    "calibration_fingerprint",
    "collect_gradients",
    "distillation_loss",
    "get_criterion",
    "nm_mask",
    "prune",
    "prune_recipe",
    "register",
    "register_family",
    "run_layerwise",
    "compact",
    "load_pretrained",
    "save_pretrained",
]
from .surgery import compact, load_pretrained, save_pretrained  # noqa: E402
