"""Export and reload: a (compacted) model written atomically as safetensors with a manifest, and loaded back,
per-layer (non-uniform) exports included."""

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

from ..loading import from_pretrained
from ..masks.routing import masked_routers
from ..record import library_versions
from ..structure import FamilySpec, GroupSet, ModelStructure, config_value, family_of
from .compact import Kept, shrink_layer
from .layers import ALLOW, bind_layer_configs, global_widths
from .meta import TensorFiles, build_on_meta, materialise, on_meta

MANIFEST = "pruning_manifest.json"
CONFIG = "pruning_config.yaml"  # the resolved config of the run that wrote the export (pruning fit --config)


def _kept_per_layer(config: Any, fam: FamilySpec) -> list[dict[str, int]]:
    """Per-layer widths as the (stock or per-layer) config records them."""
    n = int(config.num_hidden_layers)
    attrs = ([fam.intermediate_attr] if fam.has_mlp else []) + ["num_attention_heads"]
    if config_value(config, "num_key_value_heads") is not None:
        attrs.append("num_key_value_heads")
    if getattr(config, "is_heterogeneous", False):
        view = config.per_layer_config
        out = []
        for i in range(n):
            lc = view[i]
            lc.__dict__[ALLOW] = True
            out.append({a: int(getattr(lc, a)) for a in attrs})
        return out
    return [{a: int(getattr(config, a)) for a in attrs} for _ in range(n)]


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    manifest: dict | None = None,
    config: str | None = None,
) -> Path:
    """Export ``model`` (safetensors), ``tokenizer``, a ``pruning_manifest.json`` (``manifest`` plus the model's
    widths and the library versions) and the run's ``config`` (YAML text, as ``pruning_config.yaml``) to ``path``,
    atomically.

    Everything is written to a temporary directory next to ``path`` (same filesystem), made readable like a
    ``save_pretrained`` directory (the umask's permissions, not ``mkdtemp``'s 0700), and swapped in: an atomic
    exchange of the two directories where the system has one (Linux ``renameat2``), else two renames. A crash or an
    exception leaves the previous export at ``path`` intact; temporaries an interrupted export left behind are
    removed by the next export to the same path, and a previous export moved aside by an interrupted swap is put
    back first. A model whose routers still route around masked experts is refused (saved as it is, its reload
    would route to the removed experts again): :func:`~pruning.compact` it first.
    """
    masked = masked_routers(model)
    if masked:
        raise ValueError(
            f"{masked[0]} routes around removed experts that are still in the model (masked, not compacted); an export "
            "of it would route to them again once loaded. HINT: pruning.compact(model, masks) before saving"
        )
    with atomic_export(path) as tmp:
        _write(model, tmp, tokenizer, manifest)
        if config is not None:
            (tmp / CONFIG).write_text(config)
    return Path(path).resolve()


@contextmanager
def atomic_export(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory next to ``path`` to write an export into; swapped in atomically when the block ends
    without an exception (see :func:`save_pretrained`), removed otherwise."""
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"export path {str(path)!r} is a file. HINT: pass a directory path (new, or a previous export)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_export(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _readable(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_files(model: nn.Module, directory: Path, manifest: dict | None = None) -> None:
    """What an export holds besides its weights: the config (per-layer ones too), the generation config and the
    manifest; for a writer that streams the weights itself (the model may be on the ``meta`` device)."""
    with global_widths(model.config):
        model.config.save_pretrained(str(directory))
    _drop_key(directory / "config.json", ALLOW)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(directory))
    (directory / MANIFEST).write_text(json.dumps(_manifest(model, manifest), indent=2, default=str))


def _write(model: nn.Module, directory: Path, tokenizer: Any, manifest: dict | None) -> None:
    kwargs = {}
    params = inspect.signature(model.save_pretrained).parameters
    if "safe_serialization" in params:
        kwargs["safe_serialization"] = True
    if getattr(model.config, "is_heterogeneous", False) and "save_original_format" in params:
        # a per-layer export is read back by load_pretrained under the model's own parameter names (transformers
        # would otherwise write the checkpoint's original ones, e.g. GPT-NeoX's embed_out, stacked experts split)
        kwargs["save_original_format"] = False
    # FIX: transformers >= 5.25 validates the config on save (``hidden_size % num_attention_heads``), which a
    # per-layer config refuses to answer; the global fields are the upper bounds the validation expects
    with global_widths(model.config):
        model.save_pretrained(str(directory), **kwargs)
    _drop_key(directory / "config.json", ALLOW)
    if not any(directory.glob("*.safetensors")):
        raise RuntimeError(f"{type(model).__name__}.save_pretrained wrote no .safetensors file")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    (directory / MANIFEST).write_text(json.dumps(_manifest(model, manifest), indent=2, default=str))


def _readable(directory: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)  # readable like any directory save_pretrained makes, not mkdtemp's 0700


def _swap_in(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path``; a previous export there is removed once it is no longer at ``path``."""
    if not path.exists():
        os.rename(tmp, path)
        return
    if exchange(tmp, path):  # atomic: at every moment ``path`` holds the old or the new export
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, aside / "export")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside / "export", path)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the system cannot."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def recover_export(path: str | os.PathLike) -> None:
    """After an interrupted export to ``path``: the previous export put back if a swap left it aside (and nothing
    at ``path``), and the temporary directories left next to ``path`` removed."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    for aside in sorted(parent.glob(f".{path.name}.old-*")):
        if not path.exists() and (aside / "export").is_dir():
            os.rename(aside / "export", path)
        shutil.rmtree(aside, ignore_errors=True)
    for tmp in parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_key(path: Path, key: str) -> None:
    """Remove a top-level key from a JSON file, if present."""
    obj = json.loads(path.read_text())
    if key in obj:
        del obj[key]
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _manifest(model: nn.Module, extra: dict | None) -> dict:
    out = dict(extra or {})
    fam = family_of(model)
    out.update(
        {
            "library_versions": library_versions(),
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


def load_pretrained(path: str | os.PathLike, *, allow_pickle: bool = False, **kwargs: Any) -> nn.Module:
    """Load any export of :func:`save_pretrained` (or any local Hugging Face checkpoint), safetensors only unless
    ``allow_pickle`` (a pickled ``pytorch_model.bin`` can run code when loaded).

    Stock configs go to ``AutoModelForCausalLM.from_pretrained(path, **kwargs)``. Per-layer configs are built from
    the config at the global (upper-bound) widths with their parameters on the ``meta`` device (no memory, no
    initialisation), each layer's Linears are made at the recorded sizes and the attention modules' head counts
    fixed, then the safetensors weights are assigned one tensor at a time (memory-mapped; never pickles). For those,
    ``kwargs`` may hold ``dtype``/``torch_dtype``, ``device`` and ``attn_implementation``.
    """
    path = Path(path)
    if not path.exists():
        recover_export(path)  # an export interrupted between its two renames left the previous one aside
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
    model = build_export_on_meta(path, kwargs.get("attn_implementation"))
    saved_dtype = _load_safetensors(model, path)
    if dtype is None or dtype == "auto":
        dtype = saved_dtype
    if dtype is not None:
        model.to(dtype)
    if kwargs.get("device") is not None:
        model.to(kwargs["device"])
    return model.eval()


def build_export_on_meta(path: str | os.PathLike, attn_implementation: str | None = None) -> nn.Module:
    """The model of a checkpoint or export directory with its parameters on the ``meta`` device, per-layer widths
    included (each layer's Linears made at their recorded sizes, the attention modules' head counts fixed): the
    weights are to be assigned afterwards (:func:`_load_safetensors`, or each rank's shard under FSDP)."""
    config = read_config(path)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    if not getattr(config, "is_heterogeneous", False):
        return build_on_meta(config)
    view = config.per_layer_config
    layer_cfgs = []
    for i in range(int(config.num_hidden_layers)):
        lc = view[i]
        lc.__dict__[ALLOW] = True
        layer_cfgs.append(lc)
    with global_widths(config):
        model = build_on_meta(config)  # no full-width weights: the layers are cut on meta, then assigned
    structure = ModelStructure(model)
    has_kv = config_value(config, "num_key_value_heads") is not None
    full = _full_width_sets(structure)  # before any layer shrinks
    fam = structure.family
    for i, lc in enumerate(layer_cfgs):
        heads = int(lc.num_attention_heads)
        kv = int(lc.num_key_value_heads) if has_kv else heads
        inter = int(getattr(lc, fam.intermediate_attr)) if fam.has_mlp else 0
        experts = (
            (int(getattr(lc, fam.experts_attr)), int(getattr(lc, fam.expert_intermediate_attr)))
            if fam.experts
            else (0, 0)
        )
        sets = {k: v[i] for k, v in full.items() if v[i] is not None}
        shrink_layer(structure, i, _leading(sets, inter, heads, kv, experts), {})
    bind_layer_configs(model, fam)
    return model


def _full_width_sets(structure: ModelStructure) -> dict[str, list[GroupSet | None]]:
    """The group sets a per-layer export's layers are cut from (query heads only with grouped-query attention;
    experts and the neurons inside them in the layers that have experts, ``None`` in the others)."""
    fam = structure.family
    kinds = (["mlp_neuron"] if fam.has_mlp else []) + (["attention_head"] if fam.head_groups else [])
    if fam.head_groups and structure.num_heads > structure.num_kv_heads:
        kinds.append("query_head")
    out: dict[str, list[GroupSet | None]] = {kind: structure.group_sets(kind) for kind in kinds}  # type: ignore
    if fam.experts:
        moe = [i for i in range(structure.num_layers) if structure.expert_params(i)]
        for kind in ("expert", "expert_neuron"):
            found = dict(zip(moe, structure.group_sets(kind, moe)))  # type: ignore[arg-type]
            out[kind] = [found.get(i) for i in range(structure.num_layers)]
    return out


def _leading(
    sets: dict[str, GroupSet], inter: int, heads: int, kv: int, experts: tuple[int, int] = (0, 0)
) -> dict[str, Kept]:
    """The group sets of one layer of a full-width model keeping the leading ``inter`` neurons, ``kv`` KV groups and
    ``heads // kv`` query heads of each, and the leading ``experts[0]`` experts with the leading ``experts[1]``
    neurons of each: the shapes of a per-layer export's layer (its weights are loaded after)."""
    limits = {"mlp_neuron": inter, "attention_head": kv, "expert": experts[0]}
    out = {k: (sets[k], torch.arange(sets[k].count) < limits[k]) for k in limits if k in sets}
    for kind, per in (("query_head", heads // kv), ("expert_neuron", experts[1])):
        if kind in sets:
            g = sets[kind]
            out[kind] = (g, torch.arange(g.count) % (g.count // g.partitions) < per)
    return out


def is_per_layer_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local model directory whose config has per-layer widths (``per_layer_config``): such an
    export loads with :func:`load_pretrained` only (stock ``from_pretrained`` refuses it)."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("per_layer_config"))
    except (json.JSONDecodeError, AttributeError):
        return False


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
    """Assign the export's safetensors to ``model`` (built on the ``meta`` device), one tensor at a time, memory-
    mapped; returns the dtype of its floating-point weights."""
    tensors = TensorFiles(path, model)
    try:
        own = set(model.state_dict())
        unexpected = [k for k in tensors.keys() if k not in own]
        if unexpected:
            raise ValueError(f"weights the model does not have: {unexpected[:5]}")
        missing = materialise(model, tensors)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.is_meta), None)
    finally:
        tensors.close()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    really_missing = [k for k in missing if k not in tied]
    if really_missing:
        raise ValueError(f"the export lacks weights: {really_missing[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if on_meta(model):
        raise ValueError(f"the export lacks weights: {[n for n, p in model.named_parameters() if p.is_meta][:5]}")
    return dtype
