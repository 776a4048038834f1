"""The ``pruning`` console script. ``pruning demo`` runs the offline demo; the LightningCLI subcommands
(``fit``, ``validate``, ...) arrive with the Lightning layer."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo

        demo(argv[1:])
        return
    print("usage: pruning demo [--steps N]\n(the LightningCLI subcommands fit/validate/test are not there yet)",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
