"""``pruning prune --config recipe.yaml``: one-shot pruning from a recipe (:mod:`pruning.recipe`), the same code path
as ``pruning.Recipe.load("recipe.yaml").run()``.

Examples::

    pruning prune --config configs/oneshot/wanda.yaml                      # a shipped recipe
    pruning prune --config configs/oneshot/wanda.yaml --prune.sparsity 0.6 --output.path out/wanda-60
    pruning prune --config configs/oneshot/wanda.yaml --print_config         # the whole recipe, every default
"""

from __future__ import annotations

import os
import sys

from ..recipe import RecipeResult, evaluation_lines, from_arguments


def main(argv: list[str] | None = None) -> RecipeResult:
    """Parse the recipe, run it, print a line per stage and the evaluation. A bad value is one line naming it
    (exit code 2; ``PRUNING_VERBOSE_ERRORS=1``: the traceback)."""
    try:
        recipe = from_arguments(list(sys.argv[2:] if argv is None else argv))
        result = recipe.run(log=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("PRUNING_VERBOSE_ERRORS"):
            raise
        from .parsing import concise

        sys.stderr.write(f"error: {concise(str(err))}\n")
        raise SystemExit(2) from None
    for line in evaluation_lines(result.evaluation):
        print(line, flush=True)
    return result
