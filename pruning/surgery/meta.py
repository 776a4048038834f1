"""Models built without their weights: parameters on the ``meta`` device (no memory, no initialisation), buffers
real (rotary tables and the like are computed from the config and never saved); the weights come later, one tensor
at a time, from safetensors files (memory-mapped) or from another rank."""

from __future__ import annotations

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
    """Tensor name -> the ``.safetensors`` file of directory ``path`` that holds it (from the index when sharded)."""
    path = Path(path)
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
    one in memory); files stay open (mapped, the pages read resident) until :meth:`close`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.where = safetensors_files(path)
        self._open: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f].get_tensor(name)

    def rows(self, name: str, first: int, count: int) -> torch.Tensor:
        """Rows ``first`` to ``first + count`` of tensor ``name`` (dimension 0), reading only those."""
        from safetensors import safe_open

        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f].get_slice(name)[first : first + count]

    def close(self) -> None:
        self._open.clear()


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
        if key not in tensors.where:
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


def on_meta(module: nn.Module) -> bool:
    """Whether some parameter of ``module`` has no storage (on the ``meta`` device)."""
    return any(p.device.type == "meta" for p in module.parameters())
