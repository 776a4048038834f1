"""``pruning fit | validate | test`` (and ``--print_config``): LightningCLI over
:class:`pruning.lightning.DistillationModule` and :class:`pruning.datamodules.TextDataModule`; callbacks come from the
config's ``trainer.callbacks``."""

from __future__ import annotations


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """Build the LightningCLI (``run=False`` only parses and instantiates: used by the config tests)."""
    from lightning.pytorch.cli import LightningCLI

    from ..datamodules import TextDataModule
    from .module import DistillationModule

    return LightningCLI(
        DistillationModule,
        TextDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )
