"""Physical pruning: the structured masks of a :class:`~pruning.masks.MaskSet` become smaller layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..masks import MaskSet
from ..masks.routing import unmask_routers
from ..structure import GroupSet, ModelStructure, config_value
from .layers import (
    attention_module,
    bind_layer_configs,
    config_has_head_dim,
    global_widths,
    set_head_attrs,
    set_submodule,
    shrunk_linear,
)


def _layer_widths(structure: ModelStructure) -> list[dict[str, int]]:
    """Per decoder layer, the widths its modules actually have."""
    return [
        {
            "intermediate": structure.intermediate(i),
            "heads": structure.heads(i),
            "kv_heads": structure.kv_heads(i),
            "expert_intermediate": structure.expert_width(i),
            "experts": structure.num_experts(i),
        }
        for i in range(len(structure.layers))
    ]


@torch.no_grad()
def compact(model: nn.Module, masks: MaskSet) -> nn.Module:
    """Physically remove what the structured masks removed; returns ``model`` (changed in place).

    MLP neurons, KV groups (``attention_head``), query heads, neurons inside experts, whole experts (their router
    rows with them; ``num_local_experts`` / ``num_experts`` follow, top-k unchanged) and whole layers go; the config
    is rewritten (see the module docstring). ``masks`` is consumed: its group entries are cleared, its element masks
    are re-indexed to the new shapes and names (layers renumbered; masks of removed layers dropped), the stash of
    original values is dropped and its router hooks are removed. If ``masks`` was attached it is re-attached to the
    compacted model.
    """
    was_attached = masks.attached
    masks.detach()
    cfg = model.config
    with global_widths(cfg):
        structure = ModelStructure(model)
    num_layers = structure.num_layers
    per_layer = _keep_vectors(masks, structure)

    # slicing applied to each parameter: name -> {dim: kept indices}; used to re-index element masks
    slices: dict[str, dict[int, torch.Tensor]] = {}
    changed_heads = False
    for i, kinds in sorted(per_layer.items()):
        changed_heads |= shrink_layer(structure, i, {k: v for k, v in kinds.items() if k != "layer"}, slices)

    drop = {i for i, kinds in per_layer.items() if "layer" in kinds and not bool(kinds["layer"][1].all())}
    if drop and len(drop) == num_layers:
        raise ValueError("the masks remove every decoder layer. HINT: prune a smaller fraction of layers.")
    new_index = _drop_layers(structure, cfg, drop, num_layers)
    _rewrite_config(model, structure, changed_heads)
    bind_layer_configs(model, structure.family)

    # ---- consume the masks: element masks follow the new shapes and names
    masks.reset_to(_reindexed(masks.element, structure, slices, drop, new_index))
    unmask_routers(model)  # a copy's hooks too (a deep copy of a masked model carries them)
    if was_attached:
        masks.attach(model)
    return model


Kept = tuple[GroupSet, torch.Tensor]  # a group set and its keep-vector (on the host)


def _keep_vectors(masks: MaskSet, structure: ModelStructure) -> dict[int, dict[str, Kept]]:
    """The group sets of ``masks`` with their keep-vectors, by decoder layer and kind, checked against the model's
    own group sets (same members, same counts)."""
    per_layer: dict[int, dict[str, Kept]] = {}
    own: dict[tuple[str, int], GroupSet | None] = {}
    for key, keep in masks.groups.items():
        gs = masks.group_sets[key]
        if (gs.kind, gs.layer) not in own:  # the layer's own group set (only the masked layers are read)
            fits = gs.layer < structure.num_layers
            own[gs.kind, gs.layer] = structure.group_sets(gs.kind, [gs.layer])[0] if fits else None  # type: ignore[arg-type]
        mine = own[gs.kind, gs.layer]
        if mine is None or mine.count != gs.count or mine.members != gs.members:
            bad = next((m.name for m in gs.members if mine is None or m not in mine.members), gs.members[0].name)
            raise ValueError(
                f"mask {key!r} does not fit this model (member {bad!r}). HINT: compact() needs the MaskSet "
                "made for this very model, before any other surgery; was it compacted already?"
            )
        per_layer.setdefault(gs.layer, {})[gs.kind] = (gs, keep.detach().to(torch.bool).flatten().cpu())
    return per_layer


@torch.no_grad()
def compact_layer(model: nn.Module, masks: MaskSet, layer: int) -> bool:
    """Decoder layer ``layer`` made smaller by the structured masks of ``masks`` (MLP neurons, KV groups, query
    heads), in place, the rest of the model untouched (it may be on the ``meta`` device): what a streaming export
    writes one layer at a time. Returns whether its head counts changed (for :func:`rewrite_config`). Whole layers
    are not removed here."""
    with global_widths(model.config):
        structure = ModelStructure(model)
    mine = MaskSet()
    for key, keep in masks.groups.items():
        gs = masks.group_sets[key]
        if gs.layer == layer and gs.kind != "layer":
            mine.set_groups(gs, keep)
    kinds = _keep_vectors(mine, structure).get(layer, {})
    return shrink_layer(structure, layer, kinds, {}) if kinds else False


def rewrite_config(model: nn.Module, changed_heads: bool) -> None:
    """``model.config`` rewritten to describe the widths its layers have now (after :func:`compact_layer`)."""
    with global_widths(model.config):
        structure = ModelStructure(model)
    _rewrite_config(model, structure, changed_heads)
    bind_layer_configs(model, structure.family)


def _kept_along(structure: ModelStructure, sets: dict[str, Kept]) -> dict[str, dict[int, torch.Tensor]]:
    """Per parameter and dimension, the indices the group sets keep (every member of a fused Linear combined);
    ``[experts, kept]`` per expert for an expert member (each expert keeps its own, as many as the others)."""
    keeps: dict[str, dict[int, torch.Tensor]] = {}
    for gs, keep in sets.values():
        for m in gs.members:
            shape = structure.param(m.name).shape
            vec = m.factor(keep, shape).reshape(m.experts, shape[m.dim]) if m.experts else m.factor(keep, shape)
            vec = vec if m.experts else vec.flatten()
            old = keeps.setdefault(m.name, {}).get(m.dim)
            keeps[m.name][m.dim] = vec if old is None else old & vec
    out: dict[str, dict[int, torch.Tensor]] = {}
    for name, dims in keeps.items():
        out[name] = {}
        for dim, v in dims.items():
            if not bool(v.all()):
                out[name][dim] = v.nonzero()[:, -1].reshape(*v.shape[:-1], -1)
    return out


def shrink_layer(structure: ModelStructure, i: int, sets: dict[str, Kept], slices: dict) -> bool:
    """Layer ``i``'s Linears keep what the group sets ``sets`` (MLP neurons, KV groups, query heads, by kind) keep;
    ``slices`` records each parameter's kept indices. Returns whether its head counts changed."""
    heads = _kept_heads(structure, i, sets)
    for name, dims in _kept_along(structure, sets).items():
        owner, _, attr = name.rpartition(".")
        module = structure.model.get_submodule(owner)
        if dims and (attr not in ("weight", "bias") or not isinstance(module, nn.Linear)):
            # a 3-D expert weight, or a router's weight (rows = experts): a parameter of a module of its own
            _shrink_parameter(module, attr, dims)
            if all(idx.dim() == 1 for idx in dims.values()):
                slices[name] = dims
            continue
        if attr != "weight" or not dims:
            continue
        path = owner[len(structure.layer_infos[i].prefix) :]
        rows, cols = dims.get(0), dims.get(1)
        layer = structure.layers[i]
        set_submodule(layer, path, shrunk_linear(layer.get_submodule(path), rows, cols))
        if rows is not None:
            slices[owner + ".weight"] = {0: rows}
            slices[owner + ".bias"] = {0: rows}
        else:
            slices[owner + ".weight"] = {1: cols}
    if heads is None:
        return False
    set_head_attrs(attention_module(structure.layers[i], structure.family), *heads)
    return True


def _shrink_parameter(module: nn.Module, attr: str, dims: dict[int, torch.Tensor]) -> None:
    """``module.attr`` keeps the indices ``dims`` gives along each dimension (the experts module's
    ``intermediate_dim`` follows its down projection's last axis)."""
    old = getattr(module, attr)
    new = old.detach()
    # per-expert indices (inside each expert) first, while the experts are all there; then whole experts
    for dim, idx in sorted(dims.items(), key=lambda item: item[1].dim() == 1):
        idx = idx.to(new.device)
        if idx.dim() == 2:  # each expert its own indices along ``dim``
            new = torch.stack([new[e].index_select(dim - 1, idx[e]) for e in range(len(idx))])
        else:
            new = new.index_select(dim, idx)
    setattr(module, attr, nn.Parameter(new.clone(), requires_grad=old.requires_grad))
    if attr == "down_proj" and isinstance(getattr(module, "intermediate_dim", None), int):
        module.intermediate_dim = new.shape[-1]
    if 0 in dims and isinstance(getattr(module, "num_experts", None), int):  # whole experts removed
        module.num_experts = new.shape[0]


def _kept_heads(structure: ModelStructure, i: int, sets: dict[str, Kept]) -> tuple[int, int] | None:
    """Layer ``i``'s (query heads, KV heads) after the head sets in ``sets`` (``None``: unchanged)."""
    if "attention_head" not in sets and "query_head" not in sets:
        return None
    n_kv, n_h = structure.kv_heads(i), structure.heads(i)
    rep = n_h // n_kv
    kv_keep = sets["attention_head"][1] if "attention_head" in sets else torch.ones(n_kv, dtype=torch.bool)
    q_keep = sets["query_head"][1] if "query_head" in sets else torch.ones(n_h, dtype=torch.bool)
    q_keep = q_keep & kv_keep.repeat_interleave(rep)
    if not bool(kv_keep.any()) or not bool(q_keep.any()):
        raise ValueError(
            f"layer {i} would keep no attention head; a layer without attention cannot be expressed by the "
            "model's code. HINT: prune with min_keep > 0, or remove the whole layer (granularity='layer')."
        )
    if bool(kv_keep.all()) and bool(q_keep.all()):
        return None
    return int(q_keep.sum()), int(kv_keep.sum())


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


def _rewrite_config(model: nn.Module, structure: ModelStructure, changed_heads: bool) -> None:
    """Describe the new widths in ``model.config``: stock fields when uniform, else ``per_layer_config``."""
    fam, hd = structure.family, structure.head_dim
    cfg = model.config
    widths = _layer_widths(structure)
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
        if fam.has_mlp:
            setattr(cfg, fam.intermediate_attr, w["intermediate"])
        if w["expert_intermediate"]:
            setattr(cfg, fam.expert_intermediate_attr, w["expert_intermediate"])
        if w["experts"]:
            setattr(cfg, fam.experts_attr, w["experts"])
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
        o = {fam.intermediate_attr: w["intermediate"]} if fam.has_mlp else {}
        o["num_attention_heads"] = w["heads"]
        if w["expert_intermediate"]:
            o[fam.expert_intermediate_attr] = w["expert_intermediate"]
            o[fam.experts_attr] = w["experts"]
        if has_kv:
            o["num_key_value_heads"] = w["kv_heads"]
        overrides[i] = o
    cfg.per_layer_config = overrides
