"""The ``pruning`` console script: one subcommand per task (``pruning --help`` lists them, ``pruning CMD --help``
shows each one's flags, ``--config FILE`` / ``--print_config`` work for every one).

- ``pruning fit --config configs/<recipe>.yaml`` (and ``validate``, ``test``): pruning while training, through
  LightningCLI (:mod:`pruning.lightning.cli`).
- ``pruning prune --config configs/oneshot/<recipe>.yaml``: one-shot pruning from a recipe (:mod:`pruning.recipe`).
- ``pruning eval PATH``: held-out perplexity (recorded protocol) and lm-eval tasks of an export, a checkpoint or a
  hub model, in-process (:mod:`pruning.commands.eval`).
- ``pruning search``: Self-Pruner's evolutionary search of per-layer rates (:mod:`pruning.commands.search`).
- ``pruning rank``: SAAP's importance-fluctuation ranking into per-layer rates (:mod:`pruning.commands.rank`).
- ``pruning demo-model`` / ``pruning demo``: the small Llama of the offline demo; every criterion on it one-shot.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

# name -> (module of pruning.commands, its entry, its line in `pruning --help`); no module: LightningCLI
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fit": ("", "", "prune while training: LightningCLI over a recipe in configs/ (--config)"),
    "validate": ("", "", "LightningCLI's validation loop over a recipe (--config)"),
    "test": ("", "", "LightningCLI's test loop over a recipe (--config; a module with a test_step)"),
    "prune": ("prune", "main", "one-shot pruning from a recipe in configs/oneshot/ (--config)"),
    "eval": ("eval", "main", "perplexity and lm-eval tasks of an export, a checkpoint or a hub model"),
    "search": ("search", "main", "Self-Pruner: evolutionary search of per-layer rates, written as JSON"),
    "rank": ("rank", "main", "SAAP: sigma and importance-fluctuation layer rates, written as JSON"),
    "demo": ("demo", "main", "the offline demo: every criterion one-shot on the shipped demo model"),
    "demo-model": ("demo", "prepare", "put the shipped demo model in .cache/demo-model (or train it anew)"),
}


def usage() -> str:
    """``pruning --help``: every subcommand with one line."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: pruning <command> [--config FILE] [--print_config] [options]",
        "",
        "Prune decoder-only LLMs and train them back to health. Commands:",
        *(f"  {name:<{width}}  {line}" for name, (_, _, line) in COMMANDS.items()),
        "",
        "`pruning <command> --help` lists a command's options; every one takes --config and --print_config.",
    ]
    return "\n".join(lines)


def _threads() -> None:
    # torchrun leaves OMP_NUM_THREADS unset with one process per node, and DDP processes on one host would each
    # take every core: honour the variable when set, else share the cores between the local processes.
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def main(argv: list[str] | None = None) -> None:
    """The console script (its exit status: 0, or what a command raises)."""
    run(argv)


def run(argv: list[str] | None = None) -> object:
    """Run the subcommand ``argv[0]`` with the rest; returns what it returns (``pruning prune``: the
    :class:`pruning.recipe.RecipeResult`; ``pruning eval``: the results)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    name = argv[0]
    if name not in COMMANDS:
        sys.stderr.write(f"error: unknown command {name!r}; allowed: {', '.join(COMMANDS)}. HINT: pruning --help\n")
        raise SystemExit(2)
    module, function, _ = COMMANDS[name]
    if name not in ("demo", "demo-model"):  # the demo sets its own threads (its numbers do not depend on them)
        _threads()
    if not module:
        return fit(argv)
    entry = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    return entry(argv[1:])


def fit(argv: list[str]) -> None:
    """``pruning fit | validate | test``: LightningCLI. An error raised before training starts (a bad config value,
    data or model the start-up checks refuse) is printed as one line naming what to fix, exit code 2; errors during
    training keep their traceback (``PRUNING_VERBOSE_ERRORS=1``: always)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ..lightning.cli import TrainingStarted, lightning_cli
    from .parsing import concise

    _quiet_lightning()
    TrainingStarted.started = False  # per run: an earlier run in this process (tests, notebooks) must not count
    try:
        lightning_cli(argv)
    except (ValueError, TypeError, FileNotFoundError, MisconfigurationException) as err:
        if TrainingStarted.started or os.environ.get("PRUNING_VERBOSE_ERRORS"):
            raise
        # one line, the last of the output (PRUNING_VERBOSE_ERRORS=1: the traceback)
        hint = ""
        if "test_step" in str(err):  # DistillationModule validates (held-out perplexity) but has no test loop
            hint = " HINT: `pruning validate --config ...` measures the held-out perplexity"
        sys.stderr.write(f"error: {concise(str(err))}{hint}\n")
        raise SystemExit(2) from None


class _NoTips(logging.Filter):
    """Drops Lightning's advertisement of its cloud logger (printed by every run without it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _quiet_lightning() -> None:
    """What every ``pruning fit`` printed that says nothing about the run: Lightning's cloud-logger tip, and torch's
    deprecation of ``LeafSpec`` that Lightning's own pytree helper triggers."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


if __name__ == "__main__":
    main()
