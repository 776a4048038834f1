"""``pruning fit | validate | test`` (and ``--print_config``): LightningCLI over
:class:`pruning.lightning.DistillationModule` and :class:`pruning.datamodules.TextDataModule`; callbacks come from the
config's ``trainer.callbacks``.

A bad config is reported in one line naming the key to fix: jsonargparse's message (the usage of every key and the
type of every member of a union, 80–120 lines with the useful line in the middle) is cut to its innermost
``key: what was expected, what was given``; ``PRUNING_VERBOSE_ERRORS=1`` shows it whole.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..commands.parsing import one_line_error


class PruningArgumentParser(LightningArgumentParser):
    """Parse errors in one line (see the module docstring)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("PRUNING_VERBOSE_ERRORS"):
            super().error(message, ex)
        one_line_error(self, message, ex)


class TrainingStarted(pl.Callback):
    """Marks the moment training starts: errors before it are start-up errors (a config or data to fix)."""

    started = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        TrainingStarted.started = True


class PruningCLI(LightningCLI):
    """LightningCLI with one-line parse errors and a marker of the start of training."""

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(TrainingStarted())
        return trainer


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the LightningCLI (``run=False`` only parses and instantiates: used by the config tests)."""
    from ..datamodules import TextDataModule
    from .module import DistillationModule

    if args is not None and list(args) == sys.argv[1:]:
        args = None  # the console script's own arguments: LightningCLI reads sys.argv itself (no "args" warning)
    return PruningCLI(
        DistillationModule,
        TextDataModule,
        args=args,
        run=run,
        parser_class=PruningArgumentParser,
        save_config_kwargs={"overwrite": True},
    )
