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

__all__ = [
    "PICKLE_SUFFIXES",
    "PickleRefused",
    "check_exists",
    "from_pretrained",
    "refuse_pickles",
    "refused_checkpoint",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class PickleRefused(ValueError):
    """A file would have to be unpickled, which can run code."""


def check_exists(name_or_path: str | os.PathLike, key: str = "pretrained") -> None:
    """A name that can only be a local path (absolute, ``./``, ``~``, more than one ``/``) must exist: the hub's
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" is no help for a mistyped path."""
    text = str(name_or_path)
    local = text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or text.endswith("/")
    if local and not Path(text).expanduser().exists():
        raise ValueError(
            f"{key}={text!r}: no such directory (relative to {os.getcwd()}). HINT: fix the path to the model "
            "directory (config.json and *.safetensors), or give a hub name such as 'meta-llama/Llama-3.2-1B'"
        )


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

    check_exists(name_or_path, key)
    if not allow_pickle:
        refuse_pickles(name_or_path, key)
    kwargs.setdefault("trust_remote_code", False)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(name_or_path), use_safetensors=None if allow_pickle else True, **kwargs
        )
    except OSError as err:
        if Path(name_or_path).expanduser().exists():
            raise
        raise ValueError(
            f"{key}={str(name_or_path)!r} is neither a local directory (relative to {os.getcwd()}) nor a model the "
            f"Hugging Face hub could give ({str(err).splitlines()[0][:200]}). HINT: fix the path, or the hub name "
            "and your network / HF_HUB_OFFLINE setting"
        ) from err


def refused_checkpoint(path: str | os.PathLike, err: Exception) -> PickleRefused:
    """The error for a checkpoint that ``torch.load(weights_only=True)`` would not unpickle (``err``)."""
    return PickleRefused(
        f"{str(path)!r} holds objects that are not plain weights and would run code to be rebuilt; it is refused "
        f"({str(err).splitlines()[-1][:300]}). HINT: load it only if you trust it, with torch.load(path, "
        "weights_only=False), and save its state_dict again."
    )
