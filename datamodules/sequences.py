"""Tokenised sequences in memory: the ``[N, L]`` dataset whose items are whole batches, and how packed token
streams, seeded windows and Alpaca examples become one (see :mod:`pruning.datamodules.text` for the modes)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pruning.text.reader import READ_CHUNK, TextReader, chunks
from pruning.text.stdlib import windows
from pruning.text.tokens import IGNORE_INDEX, Encoder, packed_stream

from .options import DEFAULT_WINDOWS, WINDOW_POOL, invalid_argument

__all__ = [
    "InMemorySplit",
    "Sequences",
    "held_out_sequences",
    "instruct_examples",
    "instruct_sequences",
    "packed_sequences",
    "seeded_windows",
]


class Sequences(Dataset):
    """Sequences ``[N, L]`` (int32 storage); an item is a *batch*: a list of indices -> dict of LongTensors
    (``labels`` = ``input_ids`` when none are stored; ``attention_mask`` only when stored)."""

    def __init__(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ):
        self.input_ids = input_ids.to(torch.int32).contiguous()
        self.labels = None if labels is None else labels.to(torch.int32).contiguous()
        self.attention_mask = None if attention_mask is None else attention_mask.to(torch.int32).contiguous()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: list[int] | int) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index if isinstance(index, list) else [index], dtype=torch.long)
        ids = self.input_ids[idx].long()
        batch = {"input_ids": ids, "labels": ids.clone() if self.labels is None else self.labels[idx].long()}
        if self.attention_mask is not None:
            batch["attention_mask"] = self.attention_mask[idx].long()
        return batch

    def select(self, index: torch.Tensor) -> Sequences:
        """The sequences at ``index``, in that order."""
        pick = lambda t: None if t is None else t[index]
        return Sequences(self.input_ids[index], pick(self.labels), pick(self.attention_mask))

    def first(self, n: int) -> Sequences:
        """The first ``n`` sequences (all of them when there are fewer)."""
        return self.select(torch.arange(min(n, len(self))))

    def sha256(self) -> str:
        """sha256 of the int64 token ids (row-major), the scheme of :func:`pruning.pipeline.calibration_fingerprint`."""
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def counts(self) -> dict[str, int]:
        """Sequences, tokens (not padding) and tokens that take a loss."""
        n = len(self)
        tokens = int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()
        labelled = int((self.labels != IGNORE_INDEX).sum()) if self.labels is not None else tokens
        return {"sequences": n, "tokens": tokens, "labelled_tokens": labelled}


def packed_sequences(stream: np.ndarray, seq_len: int, n: int | None = None) -> Sequences:
    """Consecutive ``seq_len`` sequences of a token stream (the remainder dropped), at most ``n`` of them."""
    count = stream.size // seq_len
    if n is not None:
        count = min(count, n)
    return Sequences(torch.from_numpy(stream[: count * seq_len].reshape(count, seq_len)))


def seeded_windows(stream: np.ndarray, seq_len: int, n: int, seed: int) -> Sequences:
    """``n`` windows of ``seq_len`` tokens at seeded random offsets of a stream (:func:`pruning.text.windows`)."""
    return Sequences(windows(torch.from_numpy(stream), seq_len, n, seed=seed))


def instruct_examples(
    docs: Iterable[tuple[str, str]], encoder: Encoder, enough: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ids, labels)`` of every (prompt, response), read a chunk at a time; stops after the chunk that brings
    the count to ``enough``."""
    examples: list[tuple[np.ndarray, np.ndarray]] = []
    for chunk in chunks(docs, READ_CHUNK):
        examples.extend(encoder.examples(chunk))
        if enough is not None and len(examples) >= enough:
            break
    return examples


def instruct_sequences(
    examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, packing: bool
) -> tuple[Sequences, int]:
    """Padded (or packed) instruct sequences, and how many examples were dropped (no response token left)."""
    if packing:
        ids = np.concatenate([e[0] for e in examples]) if examples else np.zeros(0, np.int64)
        labels = np.concatenate([e[1] for e in examples]) if examples else np.zeros(0, np.int64)
        n = len(ids) // seq_len
        return Sequences(
            torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len)),
            torch.from_numpy(labels[: n * seq_len].reshape(n, seq_len)),
        ), 0
    kept = [(i[:seq_len], lab[:seq_len]) for i, lab in examples if (lab[:seq_len] != IGNORE_INDEX).any()]
    n = len(kept)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((n, seq_len), dtype=torch.int64)
    for row, (i, lab) in enumerate(kept):
        ids[row, : len(i)] = torch.from_numpy(i)
        labels[row, : len(lab)] = torch.from_numpy(lab)
        mask[row, : len(i)] = 1
    return Sequences(ids, labels, mask), len(examples) - n


class InMemorySplit:
    """The training split read into memory, as the DataModule's modes cut it. Its packed token stream is kept per
    length read, so training windows and calibration windows read the split once.

    Args:
        reader: the split's reader; caps: its ``max_bytes`` / ``max_documents``; encoder: its tokenisation.
        seq_len, seed: the sequences' length and the windows' seed.
    """

    def __init__(self, reader: TextReader, encoder: Encoder, caps: dict[str, int | None], seq_len: int, seed: int):
        self.reader, self.encoder, self.caps, self.seq_len, self.seed = reader, encoder, caps, seq_len, seed
        self.streams: dict[int | None, np.ndarray] = {}

    def tokens(self, windows_wanted: int | None = None) -> np.ndarray:
        """The packed token stream, read up to the caps (``windows_wanted``: only ``WINDOW_POOL`` × that many
        windows' worth when the split has no cap; the bytes scheme cuts exactly at ``max_bytes``)."""
        if None in self.streams:  # the whole stream is already there
            return self.streams[None]
        caps = self.caps
        limit = caps["max_bytes"] if self.encoder.tokenizer is None else None
        if windows_wanted is not None and caps["max_bytes"] is None and caps["max_documents"] is None:
            limit = WINDOW_POOL * windows_wanted * self.seq_len
        if limit not in self.streams:
            self.streams[limit] = packed_stream(self.reader.documents(**caps), self.encoder, limit)
        return self.streams[limit]

    def windows(self, n: int) -> Sequences:
        """``n`` seeded windows of the stream (the papers' calibration protocol)."""
        stream = self.tokens(n)
        if stream.size <= self.seq_len:
            raise invalid_argument(
                "seq_len",
                self.seq_len,
                f"fewer than the {stream.size} tokens read from {self.reader.describe()}",
                "lower `seq_len` or raise `max_bytes`.",
            )
        return seeded_windows(stream, self.seq_len, n, self.seed)

    def training(self, mode: str, num_samples: int | None, packing: bool, pad_id: int) -> tuple[Sequences, dict]:
        """Every training sequence of ``mode`` (before sharding), and what the record says of how they were made."""
        info: dict[str, Any] = {}
        if mode == "instruct":
            examples = instruct_examples(self.reader.documents(**self.caps), self.encoder)
            seqs, dropped = instruct_sequences(examples, self.seq_len, pad_id, packing)
            info.update(examples=len(examples), examples_without_response=dropped)
            return (seqs if num_samples is None else seqs.first(num_samples)), info
        if mode == "windows":
            return self.windows(num_samples or DEFAULT_WINDOWS), info
        stream = self.tokens()
        info["stream_tokens"] = int(stream.size)
        return packed_sequences(stream, self.seq_len, num_samples), info


def held_out_sequences(
    reader: TextReader,
    encoder: Encoder,
    caps: dict[str, int | None],
    mode: str,
    seq_len: int,
    n: int,
    packing: bool,
) -> Sequences:
    """The first ``n`` held-out sequences: non-overlapping ``seq_len`` windows of the split's stream from its start,
    or its first ``n`` instruct examples (padded or packed), read no further than they need."""
    docs = reader.documents(**caps)
    if mode == "instruct":
        examples = instruct_examples(docs, encoder, enough=2 * n)
        return instruct_sequences(examples, seq_len, encoder.pad_id, packing)[0].first(n)
    limit = n * seq_len
    if encoder.tokenizer is None and caps["max_bytes"] is not None:
        limit = min(limit, caps["max_bytes"])
    return packed_sequences(packed_stream(docs, encoder, limit), seq_len, n)
