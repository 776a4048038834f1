"""Which batches a rank trains on, and where a run stopped: the shard sampler and the resumable DataLoader.

Sharding
    Every rank reads and tokenises the same data deterministically and keeps its own shard (sequence ``i`` belongs to
    rank ``i % world_size``); all shards are cut to ``len // world_size`` sequences, so every rank yields exactly the
    same number of batches per epoch without any communication. The sampler is a ``DistributedSampler`` subclass,
    so Lightning does not inject its own. DataLoader workers each receive whole batches from that sampler and
    therefore never overlap. Streamed data is dealt to ranks and workers by :mod:`.streaming` instead.

Resumption
    The training DataLoader is *stateful* (``state_dict`` / ``load_state_dict``), which Lightning ≥ 2.2 saves in
    the checkpoint and restores before iterating. The state is (epoch, batches delivered this epoch); the order of
    an epoch is a function of ``seed + epoch`` alone, so a resumed run continues with exactly the batches that an
    uninterrupted run would have seen. The loader keeps its own epoch, advanced when an epoch's last batch has been
    delivered; a new ``iter()`` continues where the last one stopped (``sampler.set_epoch`` is ignored: Lightning's
    epoch counter at resume differs from an uninterrupted run's). The loader has a length, so Lightning does not
    prefetch from it and the count of delivered batches is the count of batches trained on. Streamed data resumes
    exactly too, at the cost of a re-read: each worker re-reads its stream from the start of the epoch and skips
    what was already delivered (the same ``num_workers`` is needed: it decides which stream a batch comes from).
    ``load_state_dict`` refuses a state saved for other data (another sha256 of all sequences, world size, batch
    size, ...) rather than resuming at a position that means something else.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .streaming import StreamDataset

__all__ = ["Position", "ResumableDataLoader", "ShardSampler"]


class Position:
    """Where an epoch stands: the epoch and the number of its batches already delivered."""

    def __init__(self, num_batches: int):
        self.num_batches, self.epoch, self.start = num_batches, 0, 0

    def advance(self) -> None:
        self.start += 1
        if self.start >= self.num_batches:  # last batch delivered: the next iteration is the next epoch
            self.epoch, self.start = self.epoch + 1, 0

    def load(self, epoch: int, consumed: int) -> None:
        self.epoch, self.start = epoch, consumed
        if self.start >= self.num_batches:
            self.epoch, self.start = epoch + 1, 0


class ShardSampler(DistributedSampler):
    """Batches (lists of sequence indices) of one rank's shard, in a per-epoch seeded order.

    The shard is sequences ``rank, rank + world_size, ...`` cut to ``num_sequences // world_size`` for every rank;
    the order of an epoch is ``randperm(shard, seed + epoch)`` (or the shard order when ``shuffle`` is off); the
    last batch may be smaller. A ``DistributedSampler`` subclass, so Lightning neither replaces it nor wraps it. The
    epoch is ``position.epoch`` (see :meth:`set_epoch`)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        max_batches: int | None = None,
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        per_rank = len(dataset) // world_size
        self.indices = torch.arange(rank, per_rank * world_size, world_size)
        self.batch_size = batch_size
        num_batches = math.ceil(per_rank / batch_size)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        self.position = Position(num_batches)

    def batches(self, epoch: int) -> list[list[int]]:
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + epoch))]
        b = self.batch_size
        return [order[i * b : (i + 1) * b].tolist() for i in range(self.position.num_batches)]

    def __iter__(self) -> Iterator[list[int]]:
        # Taken eagerly: worker processes receive indices as soon as the iterator exists.
        return iter(self.batches(self.position.epoch)[self.position.start :])

    def __len__(self) -> int:
        return self.position.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Ignored on purpose. The epoch is the loader's own: it advances when an epoch's last batch is delivered
        and is saved by ``state_dict``. Lightning calls this with its epoch counter, which after a resume differs
        from an uninterrupted run's (a run stopped mid-epoch 0 resumes with ``set_epoch(1)``) and would change the
        order of the rest of the epoch."""


class _Counting:
    """The DataLoader's iterator, advancing the position for every batch it hands out."""

    def __init__(self, iterator: Iterator, position: Position):
        self._iterator, self._position = iterator, position

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self._position.advance()
        return batch


class ResumableDataLoader(DataLoader):
    """A DataLoader whose place in the epoch is saved by ``state_dict`` and restored by ``load_state_dict``.

    The state counts batches *handed out* by this loader. Lightning takes nothing ahead from a loader that has a
    length (its one-batch prefetch only applies to loaders without one), so that count is the number of batches
    trained on; a consumer that prefetches itself must account for it. ``persistent_workers`` is off: workers
    receive the epoch's order when they start."""

    def __init__(
        self,
        dataset: Dataset,
        position: Position,
        identity: dict,
        sampler: ShardSampler | None = None,
        num_workers: int = 0,
    ):
        super().__init__(dataset, batch_size=None, sampler=sampler, num_workers=num_workers)
        self.position = position
        self.identity = identity

    def __iter__(self) -> Iterator:
        if isinstance(self.dataset, StreamDataset):
            self.dataset.begin(self.position.epoch, self.position.start)
        return _Counting(super().__iter__(), self.position)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.position.epoch,
            "consumed": self.position.start,
            "num_batches": self.position.num_batches,
            **self.identity,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = {k: (state_dict.get(k), v) for k, v in self.identity.items() if state_dict.get(k) != v}
        if state_dict.get("num_batches") != self.position.num_batches:
            changed["num_batches"] = (state_dict.get("num_batches"), self.position.num_batches)
        if changed:
            raise ValueError(
                "TextDataModule: the checkpoint's training data differs from this run's, so the run cannot resume "
                f"where it stopped: {{key: (checkpoint, now)}} = {changed}. HINT: resume with the same `data:` "
                "settings and number of processes, or start a new fit from the weights alone (no ckpt_path)."
            )
        self.position.load(int(state_dict["epoch"]), int(state_dict["consumed"]))
