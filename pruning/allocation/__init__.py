"""How much each layer loses and which entries go.

- :mod:`.selection`: comparison groups (per row, per layer, model-wide), N:M, top-k groups, whole layers;
- :mod:`.rates`: kept counts (uniform, given rates, global ranking), OWL, the repair of proposed rates, rates files;
- :mod:`.ranking`: SAAP's importance-fluctuation ranking of the layers into rates;
- :mod:`.search`: Self-Pruner's evolutionary search of the layer rates.
"""

from .rates import (
    keep_counts_from_rates,
    keep_counts_global,
    keep_counts_uniform,
    load_rates_file,
    outlier_ratio,
    owl_rates,
    project_rates,
)
from .selection import (
    exclude_pruned,
    joint_keep,
    lowest_layers,
    select_global_unstructured,
    select_nm,
    select_unstructured,
    topk_keep,
)

__all__ = [
    "exclude_pruned",
    "joint_keep",
    "keep_counts_from_rates",
    "keep_counts_global",
    "keep_counts_uniform",
    "load_rates_file",
    "lowest_layers",
    "outlier_ratio",
    "owl_rates",
    "project_rates",
    "select_global_unstructured",
    "select_nm",
    "select_unstructured",
    "topk_keep",
]
