"""Loading weights without running code: safetensors for models, ``weights_only`` for checkpoints.

A pickle (``pytorch_model.bin``, ``*.pt``, a Lightning ``.ckpt`` unpickled in full) can run arbitrary code when it
is loaded. Every model this project loads goes through :func:`from_pretrained`, which takes safetensors only unless
the caller opts in with ``allow_pickle=True``; checkpoints are unpickled with ``torch.load(weights_only=True)``
(tensors, containers, numbers, strings and the few classes registered with
:func:`torch.serialization.add_safe_globals`), and what that refuses is reported by :func:`refused_checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["PICKLE_SUFFIXES", "PickleRefused", "from_pretrained", "refuse_pickles", "refused_checkpoint"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class PickleRefused(ValueError):
    """A file would have to be unpickled, which can run code."""


def refuse_pickles(path: str | os.PathLike, key: str = "pretrained") -> None:
    """Refuse a local model directory whose weights exist only as pickles (no ``*.safetensors``)."""
    p = Path(path).expanduser()
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefused(
            f"{key}={str(path)!r} holds its weights only as pickles ({', '.join(pickles[:3])}), and loading a pickle "
            "can run code. HINT: convert the checkpoint to safetensors (model.save_pretrained(dir, "
            "safe_serialization=True) in a trusted environment), or opt in with allow_pickle=True "
            "(--allow-pickle, model.allow_pickle: true) if you trust the file."
        )


def from_pretrained(
    name_or_path: str | os.PathLike, *, allow_pickle: bool = False, key: str = "pretrained", **kwargs: Any
):
    """``AutoModelForCausalLM.from_pretrained`` that reads safetensors only (``allow_pickle`` lifts that: then
    transformers may read ``pytorch_model.bin``). Remote code stays off unless ``trust_remote_code=True`` is given."""
    from transformers import AutoModelForCausalLM

    if not allow_pickle:
        refuse_pickles(name_or_path, key)
    kwargs.setdefault("trust_remote_code", False)
    return AutoModelForCausalLM.from_pretrained(
        str(name_or_path), use_safetensors=None if allow_pickle else True, **kwargs
    )


def refused_checkpoint(path: str | os.PathLike, err: Exception) -> PickleRefused:
    """The error for a checkpoint that ``torch.load(weights_only=True)`` would not unpickle (``err``)."""
    return PickleRefused(
        f"{str(path)!r} holds objects that are not plain weights and would run code to be rebuilt; it is refused "
        f"({str(err).splitlines()[-1][:300]}). HINT: load it only if you trust it, with torch.load(path, "
        "weights_only=False), and save its state_dict again."
    )
