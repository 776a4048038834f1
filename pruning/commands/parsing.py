"""The command line's one style: jsonargparse parsers (``--config``, ``--print_config``, typed flags whose help comes
from docstrings) whose errors are one line naming the key to fix.

jsonargparse's own message (the usage of every key and the type of every member of a union, 80–120 lines with the
useful line in the middle) is cut by :func:`concise` to its innermost ``key: what was expected, what was given``;
``PRUNING_VERBOSE_ERRORS=1`` shows it whole. LightningCLI (``pruning fit``) uses the same cut.
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from jsonargparse import ActionConfigFile, ArgumentParser

__all__ = ["CommandParser", "command_parser", "concise"]

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


def one_line_error(parser: ArgumentParser, message: str, ex: Exception | None = None) -> NoReturn:
    """``parser.error`` in one line (the only one; ``--help`` lists every key)."""
    sys.stderr.write(f"error: {concise(message)}\n")
    raise SystemExit(2)


class CommandParser(ArgumentParser):
    """A jsonargparse parser whose errors are one line (see the module docstring)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("PRUNING_VERBOSE_ERRORS"):
            super().error(message, ex)
        one_line_error(self, message, ex)


def command_parser(prog: str, description: str, config_help: str = "a YAML file of these options") -> CommandParser:
    """The parser of one subcommand, with ``--config`` and (from jsonargparse) ``--print_config``."""
    from jsonargparse import DefaultHelpFormatter

    ap = CommandParser(prog=prog, description=description, formatter_class=DefaultHelpFormatter)
    ap.add_argument("--config", action=ActionConfigFile, help=config_help)
    return ap
