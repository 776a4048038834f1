"""The Lightning-facing part of the core: the LightningModule (teacher + student) and the LightningCLI builder. The
only modules of ``pruning/`` besides ``pruning.callbacks`` and ``pruning.datamodules`` that import lightning."""

from .module import DistillationModule, LoraSettings, build_model

__all__ = ["DistillationModule", "LoraSettings", "build_model"]
