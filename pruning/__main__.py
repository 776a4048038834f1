"""``python -m pruning ...``: the same as the ``pruning`` console script."""

from .commands import main

main()
