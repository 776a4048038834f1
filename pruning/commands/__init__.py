"""The ``pruning`` console script: one subcommand per task.

- ``pruning fit --config configs/<recipe>.yaml`` (and ``validate``, ``test``, ``--print_config``): pruning while
  training, through LightningCLI (:mod:`pruning.lightning.cli`).
- ``pruning demo-model``: train (or reuse) the small Llama that the offline demo config prunes.
- ``pruning demo``: the one-shot comparison of every criterion on that model (no training loop).
- ``pruning eval PATH``: held-out perplexity (recorded protocol) and lm-eval tasks of an export, a checkpoint or a
  hub model, in-process (:mod:`pruning.commands.eval`).
- ``pruning search``: Self-Pruner's evolutionary search of per-layer rates (:mod:`pruning.commands.search`).
- ``pruning rank``: SAAP's importance-fluctuation ranking into per-layer rates (:mod:`pruning.commands.rank`).
"""

from __future__ import annotations

import os
import sys


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo

        demo(argv[1:])
        return
    if argv and argv[0] == "demo-model":
        from .demo import prepare

        prepare(argv[1:])
        return
    if argv and argv[0] == "eval":
        _threads()
        from .eval import main as eval_main

        eval_main(argv[1:])
        return
    if argv and argv[0] in ("search", "rank"):
        _threads()
        if argv[0] == "search":
            from .search import main as search

            search(argv[1:])
        else:
            from .rank import main as rank

            rank(argv[1:])
        return
    _threads()
    fit(argv)


def fit(argv: list[str]) -> None:
    """``pruning fit | validate | test``: LightningCLI. An error raised before training starts (a bad config value,
    data or model the start-up checks refuse) is printed as one line naming what to fix, exit code 2; errors during
    training keep their traceback (``PRUNING_VERBOSE_ERRORS=1``: always)."""
    from ..lightning.cli import TrainingStarted, concise, lightning_cli

    try:
        lightning_cli(argv)
    except (ValueError, TypeError, FileNotFoundError) as err:
        if TrainingStarted.started or os.environ.get("PRUNING_VERBOSE_ERRORS"):
            raise
        # one line, the last of the output (PRUNING_VERBOSE_ERRORS=1: the traceback)
        sys.stderr.write(f"error: {concise(str(err))}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
