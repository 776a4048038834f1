"""Lightning callbacks: thin adapters over the pruning core (``callbacks`` decide *when*, ``pruning`` *what*)."""

from .evaluation import EvaluationCallback
from .export import ExportOnFitEnd
from .group_finetune import GroupFinetuneCallback
from .importance import ImportanceCallback
from .pruning import PruningCallback
from .report import PruningReport

__all__ = [
    "EvaluationCallback",
    "ExportOnFitEnd",
    "GroupFinetuneCallback",
    "ImportanceCallback",
    "PruningCallback",
    "PruningReport",
]
