"""Training batches read from a stream (``streaming=True``): nothing is materialised.

Documents are dealt to ``world_size × num_workers`` disjoint streams (whole shards / files per stream through
``datasets.distributed.split_dataset_by_node`` when their number allows, else document ``d`` to stream
``d % (world_size × num_workers)``; each worker finds its stream from ``torch.utils.data.get_worker_info()``), and
every rank yields exactly ``steps_per_epoch`` batches (default: the trainer's ``max_steps`` ×
``accumulate_grad_batches``), a stream that runs dry starting a reshuffled pass again: a fixed count, so no
communication (no all-reduce) is needed. Each epoch re-reads the stream from its start (shards and a buffer of 1000
documents reshuffled with ``seed + epoch``); a resumed epoch re-reads and skips what was delivered (see
:mod:`.sampling`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pruning.text.reader import READ_CHUNK, TextReader, chunks
from pruning.text.tokens import Encoder

from .sequences import instruct_sequences

__all__ = ["StreamDataset", "pass_seed"]


def pass_seed(seed: int, epoch: int, cycle: int) -> int:
    """The shuffle seed of pass ``cycle`` over the stream in ``epoch``: ``seed + epoch`` first, then a seed derived
    from all three (a stream that runs dry starts another, differently shuffled pass)."""
    if cycle == 0:
        return seed + epoch
    return int(np.random.SeedSequence([seed, epoch, cycle]).generate_state(1)[0])


class StreamDataset(IterableDataset):
    """Batches of one rank, read from a stream; ``steps`` per epoch (see the module docstring)."""

    def __init__(
        self,
        reader: TextReader,
        encoder: Encoder,
        mode: str,
        seq_len: int,
        batch_size: int,
        steps: int,
        rank: int,
        world_size: int,
        seed: int,
        instruct_packing: bool,
        max_bytes: int | None,
        max_documents: int | None,
    ):
        self.reader, self.encoder, self.mode = reader, encoder, mode
        self.seq_len, self.batch_size, self.steps = seq_len, batch_size, steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.max_bytes, self.max_documents, self.instruct_packing = max_bytes, max_documents, instruct_packing
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.steps

    def begin(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # This worker hands out the epoch's batches start + worker, start + worker + workers, ...; the DataLoader
        # interleaves workers in order, so they arrive as start, start + 1, ... Batch j always comes from the same
        # virtual stream (j % workers), whichever worker produces it after a resume.
        first = self.start + worker
        count = len(range(first, self.steps, workers))
        return self._run(self.epoch, first % workers, workers, first // workers, count)

    def _run(self, epoch: int, stream: int, streams: int, skip: int, count: int) -> Iterator[dict[str, torch.Tensor]]:
        batches = self._batches(epoch, stream, streams)
        for _ in range(skip):
            next(batches)
        for _ in range(count):
            yield next(batches)

    def _sequences(self, epoch: int, stream: int, streams: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        n_streams = self.world_size * streams
        mine = self.rank * streams + stream
        cycle = 0
        while True:
            docs = self.reader.documents(
                pass_seed(self.seed, epoch, cycle), (mine, n_streams), self.max_bytes, self.max_documents
            )
            produced = 0
            buffer_ids, buffer_labels = np.zeros(0, np.int64), np.zeros(0, np.int64)
            for chunk in chunks(docs, READ_CHUNK):
                if self.mode == "instruct":
                    examples = self.encoder.examples(chunk)
                    if not self.instruct_packing:
                        seqs, _ = instruct_sequences(examples, self.seq_len, self.encoder.pad_id, False)
                        for r in range(len(seqs)):
                            produced += 1
                            yield seqs.input_ids[r].numpy(), seqs.labels[r].numpy(), seqs.attention_mask[r].numpy()
                        continue
                    buffer_ids = np.concatenate([buffer_ids] + [e[0] for e in examples])
                    buffer_labels = np.concatenate([buffer_labels] + [e[1] for e in examples])
                else:
                    buffer_ids = np.concatenate(
                        [buffer_ids] + [d.astype(np.int64) for d in self.encoder.documents(chunk)]
                    )
                n = len(buffer_ids) // self.seq_len
                for r in range(n):
                    produced += 1
                    cut = slice(r * self.seq_len, (r + 1) * self.seq_len)
                    yield buffer_ids[cut], (buffer_labels[cut] if self.mode == "instruct" else None), None
                buffer_ids = buffer_ids[n * self.seq_len :]
                if self.mode == "instruct":
                    buffer_labels = buffer_labels[n * self.seq_len :]
            if produced == 0:
                raise RuntimeError(
                    f"TextDataModule: stream {mine} of {n_streams} (rank {self.rank}) got no sequence from "
                    f"{self.reader.describe()}. HINT: the source has too few documents for world_size × num_workers "
                    "streams of `seq_len` tokens; lower `num_workers` or `seq_len`, or raise `max_bytes`."
                )
            cycle += 1

    def _batches(self, epoch: int, stream: int, streams: int) -> Iterator[dict[str, torch.Tensor]]:
        for group in chunks(self._sequences(epoch, stream, streams), self.batch_size):
            ids = torch.from_numpy(np.stack([g[0] for g in group])).long()
            labels = ids.clone() if group[0][1] is None else torch.from_numpy(np.stack([g[1] for g in group])).long()
            batch = {"input_ids": ids, "labels": labels}
            if group[0][2] is not None:
                batch["attention_mask"] = torch.from_numpy(np.stack([g[2] for g in group])).long()
            yield batch
