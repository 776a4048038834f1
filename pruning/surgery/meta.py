"""Models built without their weights: parameters on the ``meta`` device (no memory, no initialisation), buffers
real (rotary tables and the like are computed from the config and never saved); the weights come later, one tensor
at a time, from safetensors files (memory-mapped) or from another rank."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block, every parameter a module registers is put on the ``meta`` device (buffers stay where they
    are made): a model of any size is built in no time and no memory, its weights to be assigned afterwards."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_on_meta(config: Any) -> nn.Module:
    """The causal LM of ``config`` with its parameters on the ``meta`` device (see :func:`parameters_on_meta`)."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config)


def safetensors_files(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> the ``.safetensors`` file of directory ``path`` that holds it (from the index when sharded;
    ``path`` may also be one ``.safetensors`` file)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":  # one file
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), str(path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(path / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(path)!r} holds no .safetensors weights. HINT: export with pruning.save_pretrained().")
    where: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), str(f)))
    return where


class TensorFiles:
    """The tensors of a checkpoint's safetensors files, read one at a time (memory-mapped: a tensor read is the only
    one in memory); files stay open (mapped, the pages read resident) until :meth:`close`.

    With ``model``, tensors are asked for by the model's parameter names, which may differ from the checkpoint's:
    transformers (5.x) saves a mixture-of-experts layer one tensor per expert (Mixtral's
    ``block_sparse_moe.experts.E.w1.weight``, Qwen-MoE's and OLMoE's ``mlp.experts.E.gate_proj.weight``) while the
    model holds them stacked (``mlp.experts.gate_up_proj``, ``[experts, 2 * width, hidden]``, gate rows first, and
    ``mlp.experts.down_proj``), and renames some (GPT-NeoX's ``embed_out`` is ``lm_head``). The names are mapped by
    transformers' own conversion table for the model (what ``from_pretrained`` applies,
    :func:`transformers.conversion_mapping.get_model_conversion_mapping`), and a stacked tensor is made by its own
    converter from the experts' tensors (read then, one layer's experts at a time)."""

    def __init__(self, path: str | os.PathLike, model: nn.Module | None = None) -> None:
        self.where = safetensors_files(path)
        self._open: dict[str, Any] = {}
        self.model = model
        # model name -> (transformers' converter, or None for a plain renaming; [(checkpoint name, its pattern)])
        self.sources: dict[str, tuple[Any, list[tuple[str, str | None]]]] = {}
        if model is not None:
            self.sources = checkpoint_sources(model, self.where)

    def keys(self) -> list[str]:
        """The names the tensors can be asked for by: the model's where they are mapped, the checkpoint's elsewhere."""
        consumed = {key for _, srcs in self.sources.values() for key, _ in srcs}
        return [k for k in self.where if k not in consumed] + list(self.sources)

    def __contains__(self, name: str) -> bool:
        return name in self.sources or name in self.where

    def files_of(self, name: str) -> set[str]:
        """The files tensor ``name`` is read from (several for a tensor stacked from the experts' ones)."""
        if name in self.sources:
            return {self.where[key] for key, _ in self.sources[name][1]}
        return {self.where[name]}

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.where[key]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f].get_tensor(key)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.sources:
            return self._read(name)
        converter, srcs = self.sources[name]
        if converter is None:
            return self._read(srcs[0][0])
        from copy import deepcopy
        from functools import partial

        converter = deepcopy(converter)  # a converter collects the tensors of one target
        for key, pattern in srcs:
            converter.add_tensor(name, key, pattern, partial(self._read, key))
        out = converter.convert(name, model=self.model, config=getattr(self.model, "config", None))
        if name not in out:
            raise ValueError(f"{name}: transformers' converter made {sorted(out)} from {[k for k, _ in srcs][:4]}")
        t = out[name]
        return t[0] if isinstance(t, list) else t

    def rows(self, name: str, first: int, count: int) -> torch.Tensor:
        """Rows ``first`` to ``first + count`` of tensor ``name`` (dimension 0), reading only those (a tensor
        stacked from the experts' ones is made whole first, then cut)."""
        if name in self.sources:
            return self.get(name)[first : first + count]
        from safetensors import safe_open

        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f].get_slice(name)[first : first + count]

    def close(self) -> None:
        self._open.clear()


def checkpoint_sources(model: nn.Module, keys: Iterable[str]) -> dict[str, tuple[Any, list[tuple[str, str | None]]]]:
    """For checkpoint tensor names ``keys``: each model parameter (or buffer) name that transformers' conversion table
    for ``model`` maps some of them to, with the converter that makes it (``None``: a plain renaming) and its sources
    in the order ``from_pretrained`` stacks them (experts by number). Names the table leaves alone are left out;
    empty without a table (transformers before 5, or a model that has none)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # transformers 4: checkpoints hold the model's own names
        return {}
    if not hasattr(model, "base_model_prefix") or not hasattr(model, "config"):
        return {}
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    own = dict.fromkeys(model.state_dict(keep_vars=True))  # names only (the parameters may be on ``meta``)
    prefix = model.base_model_prefix
    out: dict[str, tuple[Any, list[tuple[str, str | None]]]] = {}
    for key in sorted(keys, key=dot_natural_key):  # as from_pretrained: experts 0, 1, ..., 10 in that order
        name, pattern = rename_source_key(key, renamings, converters, prefix, own)
        if name not in own and key in own:
            name, pattern = key, None
        if name == key and pattern is None:
            continue
        converter = by_pattern[pattern] if pattern is not None else None
        out.setdefault(name, (converter, []))[1].append((key, pattern))
    return out


def original_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the model's names; all of a layer's experts together) in the layout stock ``save_pretrained``
    writes: transformers' conversions for ``model`` undone (a stacked expert weight split into one tensor per expert,
    renamed names named back), as :func:`transformers.core_model_loading.revert_weight_conversion`, which it calls.
    Tensors it cuts are copied out (a file holds no views); ``state`` itself if nothing changes."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: the model's own names are the checkpoint's
        return state
    out = revert_weight_conversion(model, state)
    if set(out) == set(state):
        return state
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


@torch.no_grad()
def materialise(
    module: nn.Module, tensors: TensorFiles, prefix: str = "", device: Any = None, names: Iterable[str] | None = None
) -> list[str]:
    """The parameters of ``module`` (named ``prefix`` + their name in the checkpoint; only ``names`` if given) read
    from ``tensors`` and assigned, shapes checked; returns the names it found no tensor for (tied ones, typically)."""
    missing = []
    params = dict(module.named_parameters(remove_duplicate=False))
    if names is not None:
        wanted = set(names)
        params = {n: p for n, p in params.items() if n in wanted}
    for name, p in params.items():
        key = prefix + name
        if key not in tensors:
            missing.append(key)
            continue
        t = tensors.get(key)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{key}: saved shape {tuple(t.shape)} != built shape {tuple(p.shape)}")
        owner, _, attr = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        setattr(target, attr, nn.Parameter(t if device is None else t.to(device), requires_grad=p.requires_grad))
    tensors.close()  # unmapped: the pages read are no longer resident with the process
    return missing


@torch.no_grad()
def release(module: nn.Module) -> None:
    """Every parameter of ``module`` back on the ``meta`` device: its memory is freed, its shape kept."""
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        setattr(target, attr, nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad))


def trim_host_memory() -> None:
    """Hand the host memory freed so far back to the system (glibc's ``malloc_trim``; nothing elsewhere). A layer's
    tensors, once freed, otherwise stay with the process as heap the allocator keeps for later (glibc raises its
    threshold for separately mapped blocks to the size of the largest one freed, so layer-sized blocks come from the
    heap after the first), and the peak of a run that reads one layer at a time would grow with the layers read."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    import ctypes
    import ctypes.util

    for name in ("libc.so.6", ctypes.util.find_library("c")):  # glibc's soname first: find_library may find nothing
        if name is None:
            continue
        try:
            libc = ctypes.CDLL(name)
        except OSError:
            continue
        if hasattr(libc, "malloc_trim"):
            return libc
    return None


def on_meta(module: nn.Module) -> bool:
    """Whether some parameter of ``module`` has no storage (on the ``meta`` device)."""
    return any(p.device.type == "meta" for p in module.parameters())
