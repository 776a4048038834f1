"""What a result records so that it can be made again: library versions and plain, JSON-ready values."""

from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

LIBRARIES = (
    "llm-pruning", "torch", "transformers", "safetensors", "tokenizers", "numpy", "lightning", "jsonargparse",
    "torchmetrics", "peft", "datasets", "lm_eval",
)  # fmt: skip


def library_versions() -> dict[str, str | None]:
    """The installed version of every library a run may use (``None``: not installed)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # the local build's own tag (e.g. +cpu)
    return out


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses and mappings as dicts, sequences as lists, tensors as lists, paths
    as strings, other objects by their ``repr``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
