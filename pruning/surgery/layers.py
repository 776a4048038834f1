"""What compaction and export share: shrinking a Linear, per-instance head counts, reading a per-layer config."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..structure import FamilySpec

ALLOW = "allow_global_per_layer_attribute_access"


def shrunk_linear(old: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` holding the given rows (outputs) and columns (inputs) of ``old``; same dtype/device."""
    if type(old) is not nn.Linear:
        raise ValueError(
            f"surgery can only shrink plain nn.Linear modules, got {type(old).__name__}. "
            "HINT: merge adapters (e.g. peft's merge_and_unload()) and remove quantisation wrappers before compact()."
        )
    w = old.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    with torch.device("meta"):
        new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None)
    new.weight = nn.Parameter(w.clone(), requires_grad=old.weight.requires_grad)
    if old.bias is not None:
        b = old.bias.detach()
        if rows is not None:
            b = b.index_select(0, rows.to(b.device))
        new.bias = nn.Parameter(b.clone(), requires_grad=old.bias.requires_grad)
    new.train(old.training)
    return new


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def attention_module(layer: nn.Module, fam: FamilySpec) -> nn.Module:
    return layer.get_submodule(fam.q.rpartition(".")[0])


def set_head_attrs(attn: nn.Module, n_heads: int, n_kv: int | None) -> None:
    """Update the per-instance head counts an attention module reads in ``forward``."""
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, n_heads)
    if n_kv is not None:
        if isinstance(getattr(attn, "num_key_value_heads", None), int):
            attn.num_key_value_heads = n_kv
        if isinstance(getattr(attn, "num_key_value_groups", None), int):
            attn.num_key_value_groups = n_heads // n_kv


def config_has_head_dim(attn: nn.Module) -> bool:
    """Whether the family's attention takes ``head_dim`` from the config (so fewer heads are expressible)."""
    try:
        src = inspect.getsource(type(attn).__init__)
    except (OSError, TypeError):
        return False
    return '"head_dim"' in src or "config.head_dim" in src


@contextmanager
def global_widths(cfg: Any) -> Iterator[Any]:
    """Inside the block, a heterogeneous (per-layer) config answers its global fields (the upper bounds) instead of
    raising ``AmbiguousGlobalPerLayerAttributeError``: what code that validates or builds the full-width model reads.
    The switch is never left on the config (nor written into an export's config.json)."""
    if not getattr(cfg, "is_heterogeneous", False):
        yield cfg
        return
    cfg.__dict__[ALLOW] = True
    try:
        yield cfg
    finally:
        cfg.__dict__.pop(ALLOW, None)


def bind_layer_configs(model: nn.Module, fam: FamilySpec) -> None:
    """Give the modules of each decoder layer that keep the model's config (Phi-3's attention reads
    ``config.num_attention_heads`` in ``forward``) that layer's own config when the config is per-layer (a global read
    would raise ``AmbiguousGlobalPerLayerAttributeError``, and the global value is the wrong width anyway), and the
    model's config again when it is uniform. A config of the model's config class inside a layer is taken as one of
    these (the model's, or a layer's bound by an earlier compaction)."""
    cfg = model.config
    per_layer = cfg.per_layer_config if getattr(cfg, "is_heterogeneous", False) else None
    for i, layer in enumerate(model.get_submodule(fam.layers)):
        for mod in layer.modules():
            if isinstance(getattr(mod, "config", None), type(cfg)):
                mod.config = cfg if per_layer is None else per_layer[i]
