"""Physical pruning: the structured masks of a :class:`~pruning.masks.MaskSet` become smaller layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..masks import MaskSet
from ..structure import FamilySpec, ModelStructure
from .layers import (
    attention_module,
    config_has_head_dim,
    config_value,
    global_widths,
    head_index,
    set_head_attrs,
    set_submodule,
    shrunk_linear,
)


def _layer_widths(model: nn.Module, fam: FamilySpec, head_dim: int) -> list[dict[str, int]]:
    """Per decoder layer, the widths its modules actually have."""
    layers = model.get_submodule(fam.layers)
    out = []
    for layer in layers:
        w = {
            "intermediate": layer.get_submodule(fam.mlp_out).in_features,
            "heads": layer.get_submodule(fam.q).out_features // head_dim,
            "kv_heads": layer.get_submodule(fam.k).out_features // head_dim,
        }
        out.append(w)
    return out


@torch.no_grad()
def compact(model: nn.Module, masks: MaskSet) -> nn.Module:
    """Physically remove what the structured masks removed; returns ``model`` (changed in place).

    MLP neurons, KV groups (``attention_head``), query heads and whole layers go; the config is rewritten (see the
    module docstring). ``masks`` is consumed: its group entries are cleared, its element masks are re-indexed to the
    new shapes and names (layers renumbered; masks of removed layers dropped) and the stash of original values is
    dropped. If ``masks`` was attached it is re-attached to the compacted model.
    """
    was_attached = masks.attached
    masks.detach()
    cfg = model.config
    with global_widths(cfg):
        structure = ModelStructure(model)
    num_layers, hd = structure.num_layers, structure.head_dim
    per_layer = _keep_vectors(masks, dict(model.named_parameters(remove_duplicate=False)))

    # slicing applied to each parameter: name -> {dim: kept indices}; used to re-index element masks
    slices: dict[str, dict[int, torch.Tensor]] = {}
    changed_heads = False
    for i, kinds in sorted(per_layer.items()):
        if "mlp_neuron" in kinds and not bool(kinds["mlp_neuron"].all()):
            _shrink_mlp(structure, i, kinds["mlp_neuron"], slices)
        if "attention_head" in kinds or "query_head" in kinds:
            changed_heads |= _shrink_heads(structure, i, kinds, hd, slices)

    drop = {i for i, kinds in per_layer.items() if "layer" in kinds and not bool(kinds["layer"].all())}
    if drop and len(drop) == num_layers:
        raise ValueError("the masks remove every decoder layer. HINT: prune a smaller fraction of layers.")
    new_index = _drop_layers(structure, cfg, drop, num_layers)
    _rewrite_config(model, structure.family, structure, hd, changed_heads)

    # ---- consume the masks: element masks follow the new shapes and names
    masks.reset_to(_reindexed(masks.element, structure, slices, drop, new_index))
    if was_attached:
        masks.attach(model)
    return model


@torch.no_grad()
def compact_layer(model: nn.Module, masks: MaskSet, layer: int) -> bool:
    """Decoder layer ``layer`` made smaller by the structured masks of ``masks`` (MLP neurons, KV groups, query
    heads), in place, the rest of the model untouched (it may be on the ``meta`` device): what a streaming export
    writes one layer at a time. Returns whether its head counts changed (for :func:`rewrite_config`). Whole layers
    are not removed here."""
    with global_widths(model.config):
        structure = ModelStructure(model)
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if structure.layer_of(n) == layer}
    mine = MaskSet()
    for key, keep in masks.groups.items():
        gs = masks.group_sets[key]
        if gs.layer == layer and gs.kind != "layer":
            mine.set_groups(gs, keep)
    kinds = _keep_vectors(mine, params).get(layer, {})
    if "mlp_neuron" in kinds and not bool(kinds["mlp_neuron"].all()):
        _shrink_mlp(structure, layer, kinds["mlp_neuron"], {})
    if "attention_head" in kinds or "query_head" in kinds:
        return _shrink_heads(structure, layer, kinds, structure.head_dim, {})
    return False


def rewrite_config(model: nn.Module, changed_heads: bool) -> None:
    """``model.config`` rewritten to describe the widths its layers have now (after :func:`compact_layer`)."""
    with global_widths(model.config):
        structure = ModelStructure(model)
    _rewrite_config(model, structure.family, structure, structure.head_dim, changed_heads)


def _keep_vectors(masks: MaskSet, params: dict[str, nn.Parameter]) -> dict[int, dict[str, torch.Tensor]]:
    """The group keep-vectors of ``masks`` by decoder layer and kind (on the host), checked against ``params``."""
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, keep in masks.groups.items():
        gs = masks.group_sets[key]
        for m in gs.members:
            p = params.get(m.name)
            if p is None or p.shape[m.dim] != gs.count * m.size:
                raise ValueError(
                    f"mask {key!r} does not fit this model (member {m.name!r}). HINT: compact() needs the MaskSet "
                    "made for this very model, before any other surgery; was it compacted already?"
                )
        per_layer.setdefault(gs.layer, {})[gs.kind] = keep.detach().to(torch.bool).flatten().cpu()
    return per_layer


def _shrink(
    structure: ModelStructure, i: int, path: str, rows: torch.Tensor | None, cols: torch.Tensor | None, slices: dict
) -> None:
    """Layer ``i``'s Linear at ``path`` keeps its ``rows`` (outputs) or ``cols`` (inputs); ``slices`` records it."""
    layer, name = structure.layers[i], structure.lname(i, path)
    set_submodule(layer, path, shrunk_linear(layer.get_submodule(path), rows, cols))
    if rows is not None:
        slices[name + ".weight"] = {0: rows}
        slices[name + ".bias"] = {0: rows}
    else:
        slices[name + ".weight"] = {1: cols}


def _shrink_mlp(structure: ModelStructure, i: int, keep: torch.Tensor, slices: dict) -> None:
    """Layer ``i``'s MLP keeps the neurons ``keep`` says."""
    idx = keep.nonzero().flatten()
    for path in structure.family.mlp_in:
        _shrink(structure, i, path, idx, None, slices)
    _shrink(structure, i, structure.family.mlp_out, None, idx, slices)


def _shrink_heads(structure: ModelStructure, i: int, kinds: dict[str, torch.Tensor], hd: int, slices: dict) -> bool:
    """Layer ``i``'s attention keeps the KV groups and query heads ``kinds`` says; whether it changed."""
    fam = structure.family
    n_kv, n_h = structure.num_kv_heads, structure.num_heads
    rep = n_h // n_kv
    kv_keep = kinds.get("attention_head", torch.ones(n_kv, dtype=torch.bool))
    q_keep = kinds.get("query_head", torch.ones(n_h, dtype=torch.bool)) & kv_keep.repeat_interleave(rep)
    if not bool(kv_keep.any()) or not bool(q_keep.any()):
        raise ValueError(
            f"layer {i} would keep no attention head; a layer without attention cannot be expressed by the "
            "model's code. HINT: prune with min_keep > 0, or remove the whole layer (granularity='layer')."
        )
    if bool(kv_keep.all()) and bool(q_keep.all()):
        return False
    q_idx, kv_idx = head_index(q_keep, hd), head_index(kv_keep, hd)
    for path, idx in ((fam.q, q_idx), (fam.k, kv_idx), (fam.v, kv_idx)):
        _shrink(structure, i, path, idx, None, slices)
    _shrink(structure, i, fam.o, None, q_idx, slices)
    set_head_attrs(attention_module(structure.layers[i], fam), int(q_keep.sum()), int(kv_keep.sum()))
    return True


def _drop_layers(structure: ModelStructure, cfg: Any, drop: set[int], num_layers: int) -> dict[int, int]:
    """Remove the decoder layers ``drop`` (renumbering the rest, shortening per-layer config lists); returns the
    new index of every kept layer."""
    kept_layers = [i for i in range(num_layers) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept_layers)}
    if not drop:
        return new_index
    layers = structure.layers
    for i in sorted(drop, reverse=True):
        del layers[i]
    for new, layer in enumerate(layers):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new
    for name, value in list(cfg.to_dict().items()):
        if name != "architectures" and isinstance(value, list) and len(value) == num_layers:
            setattr(cfg, name, [v for j, v in enumerate(value) if j not in drop])
    cfg.num_hidden_layers = len(kept_layers)
    return new_index


def _reindexed(
    element: dict[str, torch.Tensor], structure: ModelStructure, slices: dict, drop: set[int], new_index: dict[int, int]
) -> dict[str, torch.Tensor]:
    """The element masks re-indexed to the compacted model: sliced like their parameters, renamed after the layers'
    new indices; masks of removed layers dropped."""
    prefix = structure.family.layers + "."
    out: dict[str, torch.Tensor] = {}
    for name, keep in element.items():
        for dim, idx in slices.get(name, {}).items():
            keep = keep.index_select(dim, idx.to(keep.device))
        layer_i = structure.layer_of(name)
        if layer_i is not None:
            if layer_i in drop:
                continue
            name = f"{prefix}{new_index[layer_i]}.{name[len(prefix) :].split('.', 1)[1]}"
        out[name] = keep
    return out


def _rewrite_config(model: nn.Module, fam: FamilySpec, structure: ModelStructure, hd: int, changed_heads: bool) -> None:
    """Describe the new widths in ``model.config``: stock fields when uniform, else ``per_layer_config``."""
    cfg = model.config
    widths = _layer_widths(model, fam, hd)
    layers = model.get_submodule(fam.layers)
    attn = attention_module(layers[0], fam) if len(layers) else None
    has_kv = config_value(cfg, "num_key_value_heads") is not None
    expressible = not changed_heads or (attn is not None and config_has_head_dim(attn))
    uniform = all(w == widths[0] for w in widths) if widths else True
    prior = {}
    if getattr(cfg, "is_heterogeneous", False):  # compacting an already heterogeneous model
        prior = {k: v for k, v in cfg.to_dict().get("per_layer_config", {}).items()}
        cfg.per_layer_config = None
    if uniform and expressible and not prior:
        w = widths[0]
        setattr(cfg, fam.intermediate_attr, w["intermediate"])
        if changed_heads:
            cfg.num_attention_heads = w["heads"]
            if has_kv:
                cfg.num_key_value_heads = w["kv_heads"]
            cfg.head_dim = hd
        return
    if changed_heads and attn is not None and config_has_head_dim(attn):
        cfg.head_dim = hd  # the global head count stays an upper bound; head_dim must not be derived from it
    overrides: dict[int, dict[str, int]] = {}
    for i, w in enumerate(widths):
        o = {fam.intermediate_attr: w["intermediate"], "num_attention_heads": w["heads"]}
        if has_kv:
            o["num_key_value_heads"] = w["kv_heads"]
        overrides[i] = o
    cfg.per_layer_config = overrides
