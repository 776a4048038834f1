"""Lightning callbacks: thin adapters over the pruning core (``callbacks`` decide *when*, ``pruning`` *what*)."""

from .export import ExportOnFitEnd

__all__ = ["ExportOnFitEnd"]
