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
    from ..lightning.cli import lightning_cli

    lightning_cli(argv)


if __name__ == "__main__":
    main()
