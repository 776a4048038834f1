"""``pruning fit | validate | test`` (and ``--print_config``): LightningCLI over
:class:`pruning.lightning.DistillationModule` and :class:`pruning.datamodules.TextDataModule`; callbacks come from the
config's ``trainer.callbacks``.

A bad config is reported in one line naming the key to fix: jsonargparse's message (the usage of every key and the
type of every member of a union, 80–120 lines with the useful line in the middle) is cut to its innermost
``key: what was expected, what was given``; ``PRUNING_VERBOSE_ERRORS=1`` shows it whole.
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS = re.compile(r"Problem with given class_path '([^']+)'")
# the lines of a jsonargparse union dump that say nothing about what to fix
_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Expected a <class 'NoneType'>|"
    r"Given value( type)?:|Not a valid subclass of|Subclass types expect one of|a class path|a dict with|"
    r"a dict without|Problem with given class_path)"
)


def concise(message: str) -> str:
    """The actionable line of a jsonargparse error: the innermost ``Parser key`` (with the class it belongs to) and
    the line that says what was expected and what was given; in a dump of a union's members, the one error that is
    not about a member that does not apply."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys = [(i, m.group(1)) for i, line in enumerate(lines) for m in [_KEY.search(line)] if m]
    if not keys:
        useful = [line.removeprefix("- ") for line in lines if not _NOISE.search(line)]
        return useful[0] if useful else (lines[0] if lines else message)
    where = keys[0][1]
    if len(keys) > 1:
        owner = next((m.group(1) for line in lines for m in [_CLASS.search(line)] if m), None)
        inner = keys[-1][1]
        where += f" ({owner.rsplit('.', 1)[-1]}.{inner})" if owner else f".{inner}"
    detail = next((line for line in lines[keys[-1][0] + 1 :] if not _KEY.search(line)), "")
    return f"{where}: {detail}".rstrip(": ")


class PruningArgumentParser(LightningArgumentParser):
    """Parse errors in one line (see the module docstring)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("PRUNING_VERBOSE_ERRORS"):
            super().error(message, ex)
        # one line, the only one (`pruning fit --help` lists every key; PRUNING_VERBOSE_ERRORS=1: the whole message)
        sys.stderr.write(f"error: {concise(message)}\n")
        raise SystemExit(2)


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
