"""Importance criteria, one file each, registered by name in :data:`CRITERIA`."""

from . import frequency, gblm, magnitude, mutual_info, reap, saap, sdm, sparsegpt, taylor, wanda  # noqa: F401  (registration)
from .base import CRITERIA, Criterion, ScoreContext, get_criterion, register

__all__ = ["CRITERIA", "Criterion", "ScoreContext", "get_criterion", "register"]
