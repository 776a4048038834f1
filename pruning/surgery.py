"""Physical pruning and export: make a masked model actually smaller, save it atomically, load it back.

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

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .loading import from_pretrained
from .masks import MaskSet
from .structure import FamilySpec, ModelStructure, family_of

# ~525 lines: compaction and export/reload share the config helpers above; splitting the module in two is pending
MANIFEST = "pruning_manifest.json"
_ALLOW = "allow_global_per_layer_attribute_access"


# ---------------------------------------------------------------------------------------------- helpers
def _shrunk_linear(old: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
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


def _set_sub(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _head_index(keep: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of the kept heads/groups (each ``size`` rows long)."""
    groups = keep.nonzero().flatten().cpu()
    return (groups[:, None] * size + torch.arange(size)[None, :]).flatten()


def _attention_module(layer: nn.Module, fam: FamilySpec) -> nn.Module:
    return layer.get_submodule(fam.q.rpartition(".")[0])


def _set_head_attrs(attn: nn.Module, n_heads: int, n_kv: int | None) -> None:
    """Update the per-instance head counts an attention module reads in ``forward``."""
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, n_heads)
    if n_kv is not None:
        if isinstance(getattr(attn, "num_key_value_heads", None), int):
            attn.num_key_value_heads = n_kv
        if isinstance(getattr(attn, "num_key_value_groups", None), int):
            attn.num_key_value_groups = n_heads // n_kv


def _config_has_head_dim(attn: nn.Module) -> bool:
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
    cfg.__dict__[_ALLOW] = True
    try:
        yield cfg
    finally:
        cfg.__dict__.pop(_ALLOW, None)


def _getcfg(cfg: Any, name: str, default: Any = None) -> Any:
    """Read a config attribute, also a per-layer one of a heterogeneous config (global value)."""
    getter = getattr(cfg, "_getattr_without_heterogeneous_validation", None)
    if getter is not None:
        return getter(name, default)
    return getattr(cfg, name, default)


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


# ---------------------------------------------------------------------------------------------- compact
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
    _set_sub(layer, path, _shrunk_linear(layer.get_submodule(path), rows, cols))
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
    q_idx, kv_idx = _head_index(q_keep, hd), _head_index(kv_keep, hd)
    for path, idx in ((fam.q, q_idx), (fam.k, kv_idx), (fam.v, kv_idx)):
        _shrink(structure, i, path, idx, None, slices)
    _shrink(structure, i, fam.o, None, q_idx, slices)
    _set_head_attrs(_attention_module(structure.layers[i], fam), int(q_keep.sum()), int(kv_keep.sum()))
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
    attn = _attention_module(layers[0], fam) if len(layers) else None
    has_kv = _getcfg(cfg, "num_key_value_heads") is not None
    expressible = not changed_heads or (attn is not None and _config_has_head_dim(attn))
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
    if changed_heads and attn is not None and _config_has_head_dim(attn):
        cfg.head_dim = hd  # the global head count stays an upper bound; head_dim must not be derived from it
    overrides: dict[int, dict[str, int]] = {}
    for i, w in enumerate(widths):
        o = {fam.intermediate_attr: w["intermediate"], "num_attention_heads": w["heads"]}
        if has_kv:
            o["num_key_value_heads"] = w["kv_heads"]
        overrides[i] = o
    cfg.per_layer_config = overrides


# ---------------------------------------------------------------------------------------------- export
def _kept_per_layer(config: Any, fam: FamilySpec) -> list[dict[str, int]]:
    """Per-layer widths as the (stock or per-layer) config records them."""
    n = int(config.num_hidden_layers)
    attrs = [fam.intermediate_attr, "num_attention_heads"]
    if _getcfg(config, "num_key_value_heads") is not None:
        attrs.append("num_key_value_heads")
    if getattr(config, "is_heterogeneous", False):
        view = config.per_layer_config
        out = []
        for i in range(n):
            lc = view[i]
            lc.__dict__[_ALLOW] = True
            out.append({a: int(getattr(lc, a)) for a in attrs})
        return out
    return [{a: int(getattr(config, a)) for a in attrs} for _ in range(n)]


def save_pretrained(
    model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, manifest: dict | None = None
) -> Path:
    """Export ``model`` (safetensors), ``tokenizer`` and a ``pruning_manifest.json`` to ``path``, atomically.

    Everything is written to a temporary directory next to ``path`` (same filesystem) and swapped in by renames,
    so a crash or an exception leaves the previous export at ``path`` intact and no temporary directory behind.
    """
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"export path {str(path)!r} is a file. HINT: pass a directory path (new, or a previous export)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old: Path | None = None
    try:
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True
        # FIX: transformers >= 5.25 validates the config on save (``hidden_size % num_attention_heads``), which a
        # per-layer config refuses to answer; the global fields are the upper bounds the validation expects
        with global_widths(model.config):
            model.save_pretrained(str(tmp), **kwargs)
        _drop_key(tmp / "config.json", _ALLOW)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"{type(model).__name__}.save_pretrained wrote no .safetensors file")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(model, manifest), indent=2, default=str))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "export")
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old / "export", path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not any(old.iterdir()):
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _drop_key(path: Path, key: str) -> None:
    """Remove a top-level key from a JSON file, if present."""
    obj = json.loads(path.read_text())
    if key in obj:
        del obj[key]
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _manifest(model: nn.Module, extra: dict | None) -> dict:
    import transformers

    out = dict(extra or {})
    fam = family_of(model)
    out.update(
        {
            "library_versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "model_type": model.config.model_type,
            "num_hidden_layers": int(model.config.num_hidden_layers),
            "kept_per_layer": _kept_per_layer(model.config, fam),
            "per_layer_config": bool(getattr(model.config, "is_heterogeneous", False)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_unix": time.time(),
        }
    )
    return out


# ---------------------------------------------------------------------------------------------- load
def load_pretrained(path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs: Any) -> nn.Module:
    """Load any export of :func:`save_pretrained` (or any local Hugging Face checkpoint), safetensors only unless
    ``allow_pickle`` (a pickled ``pytorch_model.bin`` can run code when loaded).

    Stock configs go to ``AutoModelForCausalLM.from_pretrained(path, **kwargs)``. Per-layer configs are built from
    the config at the global (upper-bound) widths, each layer's Linears are shrunk to the recorded sizes and the
    attention modules' head counts fixed, then the safetensors weights are loaded (never pickles). For those,
    ``kwargs`` may hold ``dtype``/``torch_dtype``, ``device`` and ``attn_implementation``.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} has no config.json. HINT: pass a directory written by save_pretrained().")
    config = read_config(path)
    if not getattr(config, "is_heterogeneous", False):
        return from_pretrained(path, allow_pickle=allow_pickle, key="path", **kwargs)

    allowed = {"dtype", "torch_dtype", "device", "attn_implementation"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(
            f"load_pretrained of a per-layer export accepts only {sorted(allowed)}, got {sorted(unknown)}. "
            "HINT: load on CPU, then move the model yourself."
        )
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if kwargs.get("attn_implementation"):
        config._attn_implementation = kwargs["attn_implementation"]
    view = config.per_layer_config
    layer_cfgs = []
    for i in range(int(config.num_hidden_layers)):
        lc = view[i]
        lc.__dict__[_ALLOW] = True
        layer_cfgs.append(lc)
    with global_widths(config):
        model = AutoModelForCausalLM.from_config(config)
    fam = family_of(model)
    layers = model.get_submodule(fam.layers)
    for layer, lc in zip(layers, layer_cfgs):
        attn = _attention_module(layer, fam)
        hd = int(attn.head_dim)
        inter = int(getattr(lc, fam.intermediate_attr))
        heads = int(lc.num_attention_heads)
        kv = getattr(lc, "num_key_value_heads", None)
        kv = int(kv) if kv is not None else heads
        for p in fam.mlp_in:
            _set_sub(layer, p, _shrunk_linear(layer.get_submodule(p), torch.arange(inter), None))
        _set_sub(layer, fam.mlp_out, _shrunk_linear(layer.get_submodule(fam.mlp_out), None, torch.arange(inter)))
        _set_sub(layer, fam.q, _shrunk_linear(layer.get_submodule(fam.q), torch.arange(heads * hd), None))
        for p in (fam.k, fam.v):
            _set_sub(layer, p, _shrunk_linear(layer.get_submodule(p), torch.arange(kv * hd), None))
        _set_sub(layer, fam.o, _shrunk_linear(layer.get_submodule(fam.o), None, torch.arange(heads * hd)))
        _set_head_attrs(attn, heads, kv if _getcfg(config, "num_key_value_heads") is not None else None)
    saved_dtype = _load_safetensors(model, path)
    if dtype is None or dtype == "auto":
        dtype = saved_dtype
    if dtype is not None:
        model.to(dtype)
    if kwargs.get("device") is not None:
        model.to(kwargs["device"])
    return model.eval()


def read_config(path: str | os.PathLike) -> Any:
    """The config of an export directory, per-layer ones included.

    FIX: from transformers 5.25 on, a Llama-family config validates ``hidden_size % num_attention_heads`` when it is
    built, which a heterogeneous config refuses to answer, so ``AutoConfig.from_pretrained`` cannot read back the
    ``per_layer_config`` it wrote. The config is built at its global (upper-bound) widths, then the per-layer
    overrides are applied."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = json.loads((Path(path) / "config.json").read_text())
    per_layer = raw.pop("per_layer_config", None)
    if not per_layer:
        return AutoConfig.from_pretrained(str(path))
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    config.per_layer_config = {int(k): v for k, v in per_layer.items()}
    return config


@torch.no_grad()
def _load_safetensors(model: nn.Module, path: Path) -> torch.dtype | None:
    """Copy the export's safetensors into ``model``; returns the dtype of its floating-point weights."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(path)!r} holds no .safetensors weights. HINT: export with pruning.save_pretrained().")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"weights the model does not have: {unexpected[:5]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: saved shape {tuple(v.shape)} != built shape {tuple(own[k].shape)}")
        own[k].copy_(v)
    missing = [k for k in own if k not in state]
    tied = getattr(model, "_tied_weights_keys", None) or {}
    really_missing = [k for k in missing if k not in tied]
    if really_missing:
        raise ValueError(f"the export lacks weights: {really_missing[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return next((v.dtype for v in state.values() if v.is_floating_point()), None)
