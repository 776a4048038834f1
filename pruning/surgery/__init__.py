"""Physical pruning and export: make a masked model actually smaller (:mod:`.compact`), save it atomically and load
it back (:mod:`.export`).

:func:`compact` turns the *structured* masks of a :class:`~pruning.masks.MaskSet` (MLP neurons, KV groups, query
heads, whole layers) into smaller ``nn.Linear`` modules and fewer decoder layers, so the pruned model runs faster
and needs less memory; element masks (unstructured, N:M) cannot shrink a dense matrix and stay as zeros.

The config is rewritten so the export describes the new shapes:

- every layer the same width → the stock fields (``intermediate_size``/``ffn_dim``, ``num_attention_heads``,
  ``num_key_value_heads``, an explicit ``head_dim``); plain ``AutoModelForCausalLM.from_pretrained`` loads it.
- widths that differ per layer (or head counts the family's config cannot express, e.g. OPT derives ``head_dim``
  from ``hidden_size // num_attention_heads``) → transformers' native heterogeneous-config convention
  ``config.per_layer_config = {layer: {attr: value}}`` (``transformers.integrations.heterogeneity``). The global
  fields keep their values before pruning (an upper bound of every layer). Llama-style modeling code does not build
  heterogeneous layers itself, so such exports load with :func:`load_pretrained`; a stock ``from_pretrained``
  refuses them loudly (``AmbiguousGlobalPerLayerAttributeError``) instead of building wrong shapes.

Limitation: a model with per-layer head counts cannot be pruned again with ``attention_head``/``query_head``
granularity (:class:`~pruning.structure.ModelStructure` assumes one head count for all layers).
"""

from .compact import compact, compact_layer, rewrite_config
from .export import (
    MANIFEST,
    atomic_export,
    build_export_on_meta,
    is_per_layer_export,
    load_pretrained,
    read_config,
    recover_export,
    save_pretrained,
    write_model_files,
)

__all__ = [
    "MANIFEST",
    "atomic_export",
    "build_export_on_meta",
    "compact",
    "compact_layer",
    "is_per_layer_export",
    "load_pretrained",
    "read_config",
    "recover_export",
    "rewrite_config",
    "save_pretrained",
    "write_model_files",
]
