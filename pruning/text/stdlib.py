"""An offline text corpus on every machine: the Python standard library's own source.

Used by the demo, the benchmarks and the tests. Files are split into train and held-out *by file* (a stable hash
of the relative path), so held-out text is never seen in training. Tokenisation here is byte-level (ids 0..255),
which needs no download and no training; real runs use the model's own tokenizer.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

BYTE_VOCAB = 256


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: Literal["train", "heldout"] = "train", heldout_every: int = 10) -> list[Path]:
    """Sorted ``.py`` files of the standard library (tests and site-packages excluded), split by file."""
    root = stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages", "test/", "idlelib/idle_test", "lib2to3/tests")) or "/tests/" in rel:
            continue
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % heldout_every
        if (bucket == 0) == (split == "heldout"):
            out.append(p)
    return out


def stdlib_bytes(split: Literal["train", "heldout"] = "train", max_bytes: int | None = None) -> torch.Tensor:
    """The split's files, each followed by a blank line, as a 1-D tensor of byte ids (cut at ``max_bytes``): the
    packed stream of :class:`pruning.text.TextReader` and :class:`pruning.text.tokens.Encoder`."""
    from .reader import TextReader
    from .tokens import Encoder, packed_stream

    docs = TextReader("stdlib", split).documents(max_bytes=max_bytes)
    return torch.from_numpy(packed_stream(docs, Encoder(), max_bytes))


def windows(ids: torch.Tensor, seq_len: int, n: int | None = None, seed: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` windows: non-overlapping from the start (``seed=None``) or drawn at seeded random offsets
    (the papers' calibration protocol: N samples × L tokens)."""
    if seed is None:
        count = ids.numel() // seq_len if n is None else min(n, ids.numel() // seq_len)
        return ids[: count * seq_len].view(count, seq_len)
    if n is None:
        raise ValueError("random windows need n")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]
