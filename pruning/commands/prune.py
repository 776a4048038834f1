"""``pruning prune --config recipe.yaml``: one-shot pruning from a recipe (:mod:`pruning.recipe`), the same code path
as ``pruning.Recipe.load("recipe.yaml").run()``.

Examples::

    pruning prune --config configs/oneshot/demo.yaml                       # a shipped recipe (offline)
    pruning prune --config configs/oneshot/demo.yaml --prune.sparsity 0.6 --output.path out/demo-60
    pruning prune --config configs/oneshot/demo.yaml --print_config          # the whole recipe, every default
"""

from __future__ import annotations

import dataclasses
import os
import sys

from ..recipe import Recipe, RecipeResult, evaluation_lines
from .parsing import CommandParser, command_parser


def parser(exit_on_error: bool = True) -> CommandParser:
    """The recipe's parser: ``--config``, ``--print_config`` and a ``--section.key`` flag per field, typed and
    documented by the dataclasses of :mod:`pruning.recipe`."""
    ap = command_parser(
        "pruning prune",
        "One-shot pruning from a recipe (model, calibration, prune, events, output, evaluation).",
        config_help="the recipe (YAML), e.g. configs/oneshot/demo.yaml",
    )
    ap.exit_on_error = exit_on_error
    ap.add_class_arguments(Recipe, None, as_group=False)
    return ap


def from_arguments(argv: list[str], exit_on_error: bool = True) -> Recipe:
    """The :class:`Recipe` of command-line arguments (``--config FILE`` and overrides); a bad value exits with one
    line (``exit_on_error``) or raises."""
    ap = parser(exit_on_error)
    cfg = ap.instantiate(ap.parse_args(list(argv)))
    fields = {f.name for f in dataclasses.fields(Recipe)}
    return Recipe(**{k: v for k, v in vars(cfg).items() if k in fields})


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
