"""Lightning callbacks: thin adapters over the pruning core (``callbacks`` decide *when*, ``pruning`` *what*)."""

from .export import ExportOnFitEnd
from .importance import ImportanceCallback
from .pruning import PruningCallback
from .report import PruningReport

__all__ = ["ExportOnFitEnd", "ImportanceCallback", "PruningCallback", "PruningReport"]
