"""Lightning DataModules for calibration and recovery text (this package may import lightning; ``pruning`` never)."""

from .text import ResumableDataLoader, TextDataModule, alpaca_prompt

__all__ = ["ResumableDataLoader", "TextDataModule", "alpaca_prompt"]
