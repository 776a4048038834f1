"""``TextDataModule``: calibration and recovery-training text for pruning runs, as a Lightning DataModule.

Sources
    ``"stdlib"`` (the bundled offline corpus: the Python standard library's source, split into ``train`` and
    ``heldout`` by file, see :mod:`pruning.text`), a local file / directory / glob of ``.txt``, ``.json``, ``.jsonl``
    or ``.parquet`` files (read with ``datasets.load_dataset("text" | "json" | "parquet", data_files=...)``), or the
    name of a dataset on the Hugging Face hub (``datasets.load_dataset(name, dataset_config, split=...)``).

Modes (every batch is a dict of ``LongTensor[B, L]``: ``input_ids``, ``labels`` = ``input_ids`` with −100 where no
loss is taken, the model shifting labels itself as Hugging Face models do, and ``attention_mask`` only in modes that
pad)
    ``packed``: documents are tokenised and joined, each followed by the separator (the bytes tokenizer:
    ``"\\n\\n"``, exactly as :func:`pruning.text.stdlib_bytes`; a Hugging Face tokenizer: ``[BOS] doc [EOS]``), and
    the stream is cut into consecutive ``seq_len`` sequences (the remainder is dropped).
    ``windows``: the papers' calibration protocol, ``num_samples`` windows of ``seq_len`` tokens at seeded random
    offsets of that stream (:func:`pruning.text.windows`).
    ``instruct``: Alpaca rows (``instruction``, optional ``input``, ``output``) in the Stanford Alpaca prompt; the
    prompt's tokens are labelled −100, the response (and EOS) is labelled; each example is padded to ``seq_len``
    (padding: label −100, ``attention_mask`` 0) or, with ``instruct_packing``, examples are packed like documents.

Distributed training
    Every rank reads and tokenises the same data deterministically and keeps its own shard (sequence ``i`` belongs to
    rank ``i % world_size``); all shards are cut to ``len // world_size`` sequences, so every rank yields exactly the
    same number of batches per epoch without any communication. The sampler is a ``DistributedSampler`` subclass,
    so Lightning does not inject its own. DataLoader workers each receive whole batches from that sampler and
    therefore never overlap. With ``streaming=True`` nothing is materialised: documents are dealt to
    ``world_size × num_workers`` disjoint streams (whole shards / files per stream through
    ``datasets.distributed.split_dataset_by_node`` when their number allows, else document ``d`` to stream
    ``d % (world_size × num_workers)``; each worker finds its stream from ``torch.utils.data.get_worker_info()``),
    and every rank yields exactly ``steps_per_epoch`` batches (default: the trainer's ``max_steps`` ×
    ``accumulate_grad_batches``), a stream that runs dry starting a reshuffled pass again: a fixed count, so no
    communication (no all-reduce) is needed either. Each epoch re-reads the stream from its start (shards and a
    buffer of 1000 documents reshuffled with ``seed + epoch``).

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

import hashlib
import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from pruning.pipeline.oneshot import calibration_fingerprint
from pruning.text.instruct import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, INSTRUCT_FIELDS, alpaca_prompt
from pruning.text.reader import READ_CHUNK, TextReader, chunks, invalid
from pruning.text.stdlib import windows
from pruning.text.tokens import IGNORE_INDEX, Encoder, packed_stream

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE_INDEX",
    "ResumableDataLoader",
    "TextDataModule",
    "alpaca_prompt",
]

MODES = ("packed", "windows", "instruct")
SAMPLE_BY = ("document", "paragraph", "line")
DEFAULT_WINDOWS = 128
STDLIB_MAX_BYTES = 4_000_000  # the stdlib corpus's default cap (the demo's size)
WINDOW_POOL = 8  # uncapped sources: windows are drawn from the first 8 × N × L tokens


def _invalid(key: str, value: Any, allowed: str, hint: str | None = None) -> ValueError:
    hint = hint or f"set `{key}` under `data:` in the config (TextDataModule({key}=...))."
    return invalid("TextDataModule", key, value, allowed, hint)


def _reader(source: str, split: str, key: str, split_key: str, mode: str, **options: Any) -> TextReader:
    """The shared reader of one split, with what this DataModule's modes need of it checked now (a bad config
    fails before any training starts)."""
    reader = TextReader(
        source, split, instruct=mode == "instruct", owner="TextDataModule", key=key, split_key=split_key, **options
    )
    if reader.kind == "stdlib" and mode == "instruct":
        raise _invalid(
            "mode",
            "instruct",
            "'packed' or 'windows' for the stdlib corpus",
            "instruct needs rows with instruction/input/output: set `source` to such a "
            ".json/.jsonl/.parquet file or hub dataset, or `mode` to 'packed'.",
        )
    if reader.kind == "local" and split != "train":
        raise _invalid(
            split_key,
            split,
            "'train' for local files",
            f"local files form the single split 'train': set `{split_key}: train`, and give "
            "held-out files with `val_source`.",
        )
    if reader.kind == "local" and reader.builder == "text" and mode == "instruct":
        raise _invalid(
            "mode",
            "instruct",
            "'packed' or 'windows' for .txt files",
            "instruct needs .json/.jsonl/.parquet rows with instruction/input/output: fix "
            "`source`, or set `mode: packed`.",
        )
    return reader


# --------------------------------------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------------------------------------


class _Sequences(Dataset):
    """Sequences ``[N, L]`` (int32 storage); an item is a *batch*: a list of indices -> dict of LongTensors."""

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

    def select(self, index: torch.Tensor) -> "_Sequences":
        pick = lambda t: None if t is None else t[index]
        return _Sequences(self.input_ids[index], pick(self.labels), pick(self.attention_mask))

    def sha256(self) -> str:
        """sha256 of the int64 token ids (row-major), the scheme of :func:`pruning.pipeline.calibration_fingerprint`."""
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def counts(self) -> dict[str, int]:
        n = len(self)
        tokens = int(self.attention_mask.sum()) if self.attention_mask is not None else self.input_ids.numel()
        labelled = int((self.labels != IGNORE_INDEX).sum()) if self.labels is not None else tokens
        return {"sequences": n, "tokens": tokens, "labelled_tokens": labelled}


def _instruct_sequences(
    examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, packing: bool
) -> tuple[_Sequences, int]:
    """Padded (or packed) instruct sequences, and how many examples were dropped (no response token left)."""
    if packing:
        ids = np.concatenate([e[0] for e in examples]) if examples else np.zeros(0, np.int64)
        labels = np.concatenate([e[1] for e in examples]) if examples else np.zeros(0, np.int64)
        n = len(ids) // seq_len
        return _Sequences(
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
    return _Sequences(ids, labels, mask), len(examples) - n


# --------------------------------------------------------------------------------------------------------------------
# sampling, position, resumable loader
# --------------------------------------------------------------------------------------------------------------------


class _Position:
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
        dataset: _Sequences,
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
        self.position = _Position(num_batches)

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

    def __init__(self, iterator: Iterator, position: _Position):
        self._iterator, self._position = iterator, position

    def __iter__(self) -> "_Counting":
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
        position: _Position,
        identity: dict,
        sampler: ShardSampler | None = None,
        num_workers: int = 0,
    ):
        super().__init__(dataset, batch_size=None, sampler=sampler, num_workers=num_workers)
        self.position = position
        self.identity = identity

    def __iter__(self) -> Iterator:
        if isinstance(self.dataset, _StreamDataset):
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


# --------------------------------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------------------------------


def _pass_seed(seed: int, epoch: int, cycle: int) -> int:
    if cycle == 0:
        return seed + epoch
    return int(np.random.SeedSequence([seed, epoch, cycle]).generate_state(1)[0])


class _StreamDataset(IterableDataset):
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
                _pass_seed(self.seed, epoch, cycle), (mine, n_streams), self.max_bytes, self.max_documents
            )
            produced = 0
            buffer_ids, buffer_labels = np.zeros(0, np.int64), np.zeros(0, np.int64)
            for chunk in chunks(docs, READ_CHUNK):
                if self.mode == "instruct":
                    examples = self.encoder.examples(chunk)
                    if not self.instruct_packing:
                        seqs, _ = _instruct_sequences(examples, self.seq_len, self.encoder.pad_id, False)
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


# --------------------------------------------------------------------------------------------------------------------
# the DataModule
# --------------------------------------------------------------------------------------------------------------------


class TextDataModule(LightningDataModule):
    """Calibration and recovery-training text: packed documents, seeded windows or Alpaca instructions.

    Batches are dicts of ``LongTensor[B, L]``: ``input_ids``, ``labels`` (``input_ids`` with −100 where no loss is
    taken; the model shifts them) and, when padding exists (``mode='instruct'`` without packing),
    ``attention_mask``. After :meth:`setup`, :attr:`record` describes the data this rank trains on (source, split,
    mode, sizes, sha256 of its token ids, world size, ...). See the module docstring for sharding and resumption.

    Args:
        source: ``"stdlib"`` (the offline Python-standard-library corpus), a local file, directory or glob of
            ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet`` files, or a Hugging Face hub dataset name.
        dataset_config: The hub dataset's configuration name (e.g. ``"wikitext-2-raw-v1"``); ignored otherwise.
        train_split: The training split: ``"train"`` or ``"heldout"`` for stdlib, ``"train"`` for local files, any
            split of a hub dataset.
        val_split: The held-out split for validation; null takes the source's own (``"heldout"`` for stdlib, none
            for local files and hub datasets unless `val_source` is set).
        val_source: Where held-out text comes from when it is not a split of `source` (same kinds as `source`;
            local files are its ``"train"`` split).
        text_field: The text column of json/parquet/hub rows (``.txt`` files have ``"text"``).
        instruct_fields: Instruct mode: the columns holding ``instruction``, ``input`` and ``output``, e.g.
            ``{output: response}``; null: those names (``response`` also accepted for ``output``).
        sample_by: How ``.txt`` files are split into documents: ``"document"`` (one per file), ``"paragraph"`` or
            ``"line"``.
        streaming: Read the training data as a stream (packed and instruct modes: nothing is materialised, every
            rank yields exactly `steps_per_epoch` batches). Windows, validation and calibration data are always
            read into memory, from the start of the split.
        steps_per_epoch: Batches per epoch. Streaming: every rank yields exactly this many; null takes the
            trainer's ``max_steps × accumulate_grad_batches``. Otherwise an upper bound (null: the whole shard).
        tokenizer: ``"bytes"`` (byte-level ids 0..255, no download; the demo model's vocabulary), a Hugging Face
            tokenizer name or local path (``AutoTokenizer.from_pretrained``), or ``"model"`` / null: the
            ``tokenizer`` attribute of the LightningModule, looked up in ``setup``.
        trust_remote_code: Passed to ``AutoTokenizer.from_pretrained``.
        add_bos: Put the BOS token before every document / example; null: as the tokenizer does by itself (never
            for ``"bytes"``, which has no BOS).
        add_eos: Put EOS after every document and instruct response (``"bytes"``: the separator ``"\\n\\n"``).
        mode: ``"packed"`` (documents joined and cut into `seq_len` sequences), ``"windows"`` (`num_samples`
            windows of `seq_len` tokens at seeded random offsets, the papers' calibration protocol) or
            ``"instruct"`` (Alpaca prompts, prompt tokens labelled −100).
        instruct_packing: In ``instruct`` mode, pack examples back to back instead of padding each to `seq_len`.
        seq_len: Tokens per sequence.
        batch_size: Sequences per training and validation batch.
        num_samples: Training sequences: windows mode draws exactly this many (null: 128); packed and instruct modes
            keep the first this many (null: all), before the split between ranks.
        val_samples: Validation sequences (non-overlapping `seq_len` windows of the held-out split from its start,
            or its first padded examples in instruct mode), split between ranks; 0 turns validation off.
        calibration_samples: Windows drawn by :meth:`calibration_dataloader` (one-shot pruning's calibration set).
        max_bytes: Stop reading a split after this many bytes of text (the bytes tokenizer's stream is cut at
            exactly this length, separators included, as ``pruning.text.stdlib_bytes``); null: 4,000,000 for the
            stdlib corpus, no limit for other sources. Windows (training and calibration) from a source without a
            limit are drawn from its first 8 × N × `seq_len` tokens.
        max_documents: Stop reading a split after this many documents; null: no limit.
        num_workers: DataLoader worker processes (each gets whole, disjoint batches).
        seed: Seed of the windows, of the per-epoch shuffle (``seed + epoch``) and of streamed passes.
        cache_dir: ``datasets`` cache directory for hub datasets (null: its default).
    """

    def __init__(
        self,
        source: str = "stdlib",
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_source: str | None = None,
        text_field: str = "text",
        instruct_fields: dict[str, str] | None = None,
        sample_by: Literal["document", "paragraph", "line"] = "document",
        streaming: bool = False,
        steps_per_epoch: int | None = None,
        tokenizer: str | None = "bytes",
        trust_remote_code: bool = False,
        add_bos: bool | None = None,
        add_eos: bool = True,
        mode: Literal["packed", "windows", "instruct"] = "packed",
        instruct_packing: bool = False,
        seq_len: int = 128,
        batch_size: int = 8,
        num_samples: int | None = None,
        val_samples: int = 128,
        calibration_samples: int = 128,
        max_bytes: int | None = None,
        max_documents: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if not isinstance(source, str) or not source:
            raise _invalid("source", source, "'stdlib', a local file/directory/glob or a hub dataset name")
        if mode not in MODES:
            raise _invalid("mode", mode, str(list(MODES)))
        if sample_by not in SAMPLE_BY:
            raise _invalid("sample_by", sample_by, str(list(SAMPLE_BY)))
        if not isinstance(text_field, str) or not text_field:
            raise _invalid("text_field", text_field, "a column name")
        if instruct_fields is not None and (
            not isinstance(instruct_fields, dict)
            or not set(instruct_fields) <= set(INSTRUCT_FIELDS)
            or not all(isinstance(v, str) and v for v in instruct_fields.values())
        ):
            raise _invalid(
                "instruct_fields",
                instruct_fields,
                f"null or a map from some of {list(INSTRUCT_FIELDS)} to column names",
            )
        for key, value, low in (
            ("seq_len", seq_len, 2),
            ("batch_size", batch_size, 1),
            ("calibration_samples", calibration_samples, 1),
            ("val_samples", val_samples, 0),
            ("num_workers", num_workers, 0),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _invalid(key, value, f"an integer >= {low}")
        for key, value in (
            ("num_samples", num_samples),
            ("steps_per_epoch", steps_per_epoch),
            ("max_bytes", max_bytes),
            ("max_documents", max_documents),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise _invalid(key, value, "null or an integer >= 1")
        tokenizer = "model" if tokenizer is None else tokenizer
        if not isinstance(tokenizer, str) or not tokenizer:
            raise _invalid("tokenizer", tokenizer, "'bytes', 'model' or a tokenizer name / path")
        if tokenizer == "bytes" and add_bos:
            raise _invalid(
                "add_bos",
                add_bos,
                "false or null with tokenizer='bytes'",
                "the bytes tokenizer has no BOS token; set `add_bos: false` or pick another `tokenizer`.",
            )
        if val_split is not None and (not isinstance(val_split, str) or not val_split):
            raise _invalid("val_split", val_split, "null or a split name")

        self.source, self.dataset_config, self.train_split = source, dataset_config, train_split
        self.val_source = val_source
        self.val_split = (
            val_split
            if val_split is not None
            else ("heldout" if (val_source or source) == "stdlib" else ("train" if val_source else None))
        )
        self.text_field, self.instruct_fields, self.sample_by = text_field, instruct_fields, sample_by
        self.streaming, self.steps_per_epoch = streaming, steps_per_epoch
        self.tokenizer_name, self.trust_remote_code, self.add_bos, self.add_eos = (
            tokenizer,
            trust_remote_code,
            add_bos,
            add_eos,
        )
        self.mode, self.instruct_packing = mode, instruct_packing
        self.seq_len, self.batch_size, self.num_samples = seq_len, batch_size, num_samples
        self.val_samples, self.calibration_samples = val_samples, calibration_samples
        self.max_bytes, self.max_documents = max_bytes, max_documents
        self.num_workers, self.seed, self.cache_dir = num_workers, seed, cache_dir
        self.save_hyperparameters()

        # Readers check local paths and split names now, so a bad config fails before any training starts.
        common = dict(
            dataset_config=dataset_config,
            text_field=text_field,
            sample_by=sample_by,
            streaming=streaming,
            cache_dir=cache_dir,
            mode=mode,
            instruct_fields=instruct_fields,
        )
        self._train_reader = _reader(source, train_split, "source", "train_split", **common)
        self._val_reader = None
        if self.val_split is not None and val_samples > 0:
            val_common = dict(common, dataset_config=dataset_config if val_source is None else None)
            self._val_reader = _reader(
                val_source or source,
                self.val_split,
                "val_source" if val_source else "source",
                "val_split",
                **val_common,
            )

        self.tokenizer: Any = None  # the resolved Hugging Face tokenizer after setup (None for "bytes")
        self.record: dict[str, Any] = {}
        self.checkpoint_record: dict[str, Any] | None = None
        self._rank_override: tuple[int, int] | None = None
        self._dist: tuple[int, int] | None = None
        self._encoder: Encoder | None = None
        self._reset()

    def _reset(self) -> None:
        self._train: _Sequences | None = None
        self._val: _Sequences | None = None
        self._calibration: _Sequences | None = None
        self._streams: dict[int | None, np.ndarray] = {}
        self._train_built = False
        self._steps: int | None = None

    @property
    def _is_stream(self) -> bool:
        return self.streaming and self.mode != "windows"

    # ------------------------------------------------------------------------------------------------ set-up
    def set_rank(self, rank: int, world_size: int) -> None:
        """Use this rank / world size instead of the trainer's or ``torch.distributed``'s (plain PyTorch launchers,
        tests). Call before :meth:`setup`."""
        if not 0 <= rank < world_size:
            raise ValueError(f"TextDataModule.set_rank: rank={rank} must be in [0, world_size={world_size})")
        self._rank_override = (rank, world_size)
        self._dist = None
        self._reset()

    def _rank_world(self) -> tuple[int, int]:
        if self._rank_override is not None:
            return self._rank_override
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _resolve_encoder(self) -> Encoder:
        if self._encoder is not None:
            return self._encoder
        name = self.tokenizer_name
        tok: Any = None
        if name == "model":
            module = self.trainer.lightning_module if self.trainer is not None else None
            tok = getattr(module, "tokenizer", None)
            if tok is None:
                raise _invalid(
                    "tokenizer",
                    name,
                    "'bytes' or a tokenizer name / path when the LightningModule has no `tokenizer` attribute",
                    "set `data.tokenizer` to the model's tokenizer name or path, or give the module a "
                    "`tokenizer` attribute.",
                )
            if isinstance(tok, str) and tok == "bytes":
                tok = None
        elif name != "bytes":
            tok = name
        if isinstance(tok, str):
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(tok, trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError) as err:
                raise _invalid(
                    "tokenizer",
                    name,
                    "'bytes', 'model' or a loadable tokenizer name / path",
                    f"{tok!r} could not be loaded ({type(err).__name__}: {str(err)[:200]}); fix `data.tokenizer`.",
                ) from err
        self.tokenizer = tok
        self._encoder = Encoder(tok, self.add_bos, self.add_eos, owner="TextDataModule")
        return self._encoder

    def prepare_data(self) -> None:
        """Download hub datasets once (Lightning calls this on one process per node before ``setup``)."""
        self._train_reader.prepare()
        if self._val_reader is not None:
            self._val_reader.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Resolve rank, world size and tokenizer; build the training data (``fit``) and validation data."""
        dist = self._rank_world()
        if dist != self._dist:
            self._dist = dist
            self._reset()
        self._resolve_encoder()
        if stage in (None, "fit"):
            self._build_train()
        if stage in (None, "fit", "validate"):
            self._build_val()

    # ------------------------------------------------------------------------------------------------ reading
    def _caps(self, reader: TextReader) -> dict[str, int | None]:
        max_bytes = self.max_bytes
        if max_bytes is None and reader.kind == "stdlib":
            max_bytes = STDLIB_MAX_BYTES
        return {"max_bytes": max_bytes, "max_documents": self.max_documents}

    def _train_tokens(self, windows_wanted: int | None = None) -> np.ndarray:
        """The training split's packed token stream, read into memory up to the caps (``windows_wanted``: only
        ``WINDOW_POOL`` × that many windows' worth when the split has no cap)."""
        if None in self._streams:  # the whole stream is already there
            return self._streams[None]
        caps = self._caps(self._train_reader)
        limit = caps["max_bytes"] if self._encoder.tokenizer is None else None  # bytes: cut exactly
        if windows_wanted is not None and caps["max_bytes"] is None and caps["max_documents"] is None:
            limit = WINDOW_POOL * windows_wanted * self.seq_len
        if limit not in self._streams:
            self._streams[limit] = packed_stream(self._train_reader.documents(**caps), self._encoder, limit)
        return self._streams[limit]

    def _windows(self, n: int) -> torch.Tensor:
        stream = self._train_tokens(n)
        if stream.size <= self.seq_len:
            raise _invalid(
                "seq_len",
                self.seq_len,
                f"fewer than the {stream.size} tokens read from {self._train_reader.describe()}",
                "lower `seq_len` or raise `max_bytes`.",
            )
        return windows(torch.from_numpy(stream), self.seq_len, n, seed=self.seed)

    def _all_train_sequences(self) -> tuple[_Sequences, dict]:
        info: dict[str, Any] = {}
        if self.mode == "instruct":
            docs = self._train_reader.documents(**self._caps(self._train_reader))
            examples = [e for chunk in chunks(docs, READ_CHUNK) for e in self._encoder.examples(chunk)]
            seqs, dropped = _instruct_sequences(examples, self.seq_len, self._encoder.pad_id, self.instruct_packing)
            info.update(examples=len(examples), examples_without_response=dropped)
            if self.num_samples is not None:
                seqs = seqs.select(torch.arange(min(self.num_samples, len(seqs))))
            return seqs, info
        if self.mode == "windows":
            return _Sequences(self._windows(self.num_samples or DEFAULT_WINDOWS)), info
        stream = self._train_tokens()
        info["stream_tokens"] = int(stream.size)
        n = stream.size // self.seq_len
        if self.num_samples is not None:
            n = min(n, self.num_samples)
        return _Sequences(torch.from_numpy(stream[: n * self.seq_len].reshape(n, self.seq_len))), info

    def _base_record(self, split: str, reader: TextReader) -> dict[str, Any]:
        rank, world = self._dist
        return {
            "source": reader.describe(),
            "split": split,
            "mode": self.mode,
            "tokenizer": self._encoder.name,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": rank,
            "world_size": world,
            "streaming": self.streaming,
            **self._caps(reader),
        }

    def _stream_steps(self) -> int:
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        trainer = self.trainer
        if trainer is not None and (getattr(trainer, "max_steps", -1) or -1) > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches
        raise _invalid(
            "steps_per_epoch",
            None,
            "an integer >= 1 when streaming without a trainer's max_steps",
            "a stream has no length: set `steps_per_epoch` (every rank yields exactly that many batches) "
            "or `trainer.max_steps`, or `streaming: false`.",
        )

    def _build_train(self) -> None:
        if self._train_built:
            return
        rank, world = self._dist
        record = self._base_record(self.train_split, self._train_reader)
        keep = {k: v for k, v in self.record.items() if k in ("val", "calibration")}
        if self._is_stream:
            steps = self._steps = self._stream_steps()
            record.update(
                sequences=steps * self.batch_size,
                tokens=steps * self.batch_size * self.seq_len,
                batches_per_epoch=steps,
                sha256=None,
                sha256_all=None,
                note="streamed: the token ids are not known before they are read (no sha256); every "
                "rank yields exactly batches_per_epoch batches",
            )
            self.record = {**record, **keep}
            self._train_built = True
            return
        every, info = self._all_train_sequences()
        if len(every) < world:
            raise _invalid(
                "max_bytes",
                self.max_bytes,
                f"enough data for {world} ranks",
                f"{self._train_reader.describe()} gives {len(every)} sequences of {self.seq_len} tokens "
                f"for {world} ranks; raise `max_bytes` / `num_samples` or lower `seq_len`.",
            )
        sampler = ShardSampler(every, self.batch_size, rank, world, self.seed, True, self.steps_per_epoch)
        mine = every.select(sampler.indices)
        self._train = every  # the sampler indexes the full set (workers share it by fork)
        record.update(info)
        record.update(mine.counts())
        record.update(
            batches_per_epoch=len(sampler),
            total_sequences=len(every),
            dropped_for_equal_shards=len(every) - len(mine) * world,
            sha256=mine.sha256(),
            sha256_all=every.sha256(),
        )
        self.record = {**record, **keep}
        self._train_built = True

    def _build_val(self) -> None:
        if self._val is not None or self._val_reader is None:
            return
        rank, world = self._dist
        reader = self._val_reader
        caps = self._caps(reader)
        docs = reader.documents(**caps)
        if self.mode == "instruct":
            examples = []
            for chunk in chunks(docs, READ_CHUNK):
                examples.extend(self._encoder.examples(chunk))
                if len(examples) >= 2 * self.val_samples:
                    break
            seqs, _ = _instruct_sequences(examples, self.seq_len, self._encoder.pad_id, self.instruct_packing)
            seqs = seqs.select(torch.arange(min(self.val_samples, len(seqs))))
        else:
            limit = self.val_samples * self.seq_len
            if self._encoder.tokenizer is None and caps["max_bytes"] is not None:
                limit = min(limit, caps["max_bytes"])
            stream = packed_stream(docs, self._encoder, limit)
            seqs = _Sequences(windows(torch.from_numpy(stream), self.seq_len, self.val_samples))
        self._val = seqs
        sampler = ShardSampler(seqs, self.batch_size, rank, world, self.seed, shuffle=False)
        mine = seqs.select(sampler.indices)
        self.record["val"] = {
            **self._base_record(self.val_split, reader),
            **mine.counts(),
            "batches": len(sampler),
            "sha256": mine.sha256(),
        }

    # ------------------------------------------------------------------------------------------------ loaders
    def _ensure(self, stage: str) -> None:
        if self._dist is None or self._encoder is None:
            self.setup(stage)
        elif stage == "fit":
            self._build_train()
        elif stage == "validate":
            self._build_val()

    def _identity(self) -> dict[str, Any]:
        ident = {
            "world_size": self._dist[1],
            "mode": self.mode,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
        if self._is_stream:
            ident.update(
                source=self.source,
                split=self.train_split,
                num_workers=self.num_workers,
                **self._caps(self._train_reader),
            )
        else:
            ident["sha256_all"] = self.record["sha256_all"]
        return ident

    def train_dataloader(self) -> ResumableDataLoader:
        """This rank's training batches, resumable mid-epoch (``state_dict`` / ``load_state_dict``)."""
        self._ensure("fit")
        rank, world = self._dist
        if self._is_stream:
            dataset = _StreamDataset(
                self._train_reader,
                self._encoder,
                self.mode,
                self.seq_len,
                self.batch_size,
                self._steps,
                rank,
                world,
                self.seed,
                instruct_packing=self.instruct_packing,
                **self._caps(self._train_reader),
            )
            return ResumableDataLoader(dataset, _Position(self._steps), self._identity(), num_workers=self.num_workers)
        sampler = ShardSampler(self._train, self.batch_size, rank, world, self.seed, True, self.steps_per_epoch)
        return ResumableDataLoader(
            self._train, sampler.position, self._identity(), sampler=sampler, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader | list:
        """This rank's share of the held-out sequences, in order (``[]``, i.e. no validation, without a split)."""
        self._ensure("validate")
        if self._val is None:
            return []
        rank, world = self._dist
        sampler = ShardSampler(self._val, self.batch_size, rank, world, self.seed, shuffle=False)
        return DataLoader(self._val, batch_size=None, sampler=sampler, num_workers=self.num_workers)

    def _calibration_set(self, num_samples: int | None) -> _Sequences:
        if self._dist is None:
            self._dist = self._rank_world()
        self._resolve_encoder()
        n = num_samples or self.calibration_samples
        if self._calibration is None or len(self._calibration) != n:
            self._calibration = _Sequences(self._windows(n))
            fp = calibration_fingerprint([self._calibration.input_ids.long()])
            self.record["calibration"] = {
                **self._base_record(self.train_split, self._train_reader),
                "mode": "windows",
                "samples": n,
                "tokens": fp["tokens"],
                "sha256": fp["sha256"],
            }
        return self._calibration

    def calibration_dataloader(self, num_samples: int | None = None, shard: bool = False) -> DataLoader:
        """``num_samples`` (default `calibration_samples`) windows of `seq_len` tokens at seeded random offsets of the
        training split, one per batch. Every rank gets all of them (identical masks without communication), or with
        ``shard=True`` its disjoint, equal share (for statistics that are all-reduced afterwards).
        ``record["calibration"]`` describes all of them."""
        data = self._calibration_set(num_samples)
        rank, world = self._dist if shard else (0, 1)
        sampler = ShardSampler(data, 1, rank, world, self.seed, shuffle=False)
        return DataLoader(data, batch_size=None, sampler=sampler, num_workers=0)

    def calibration_batches(
        self, num_samples: int | None = None, batch_size: int = 1, shard: bool = False
    ) -> list[torch.Tensor]:
        """The calibration windows as ``[batch, seq_len]`` token-id tensors, ready for ``pruning.prune``; unsharded,
        their sha256 is ``record["calibration"]["sha256"]`` (the one ``pruning.prune`` records)."""
        ids = torch.cat([b["input_ids"] for b in self.calibration_dataloader(num_samples, shard)])
        return list(ids.split(batch_size))

    def sequences(self, split: Literal["train", "val", "calibration"] = "train") -> dict[str, torch.Tensor]:
        """All sequences of a split as one batch dict, in canonical order (every rank's, before sharding and
        shuffling; calibration: the `calibration_samples` windows). Not available for streamed training data."""
        if split == "calibration":
            data = self._calibration_set(None)
        else:
            self._ensure("fit" if split == "train" else "validate")
            data = self._train if split == "train" else self._val
        if data is None:
            raise ValueError(
                f"TextDataModule.sequences: no {split!r} data (streamed training data, or no held-out "
                "split). HINT: set `streaming: false` / `val_split` / `val_source`."
            )
        return data[list(range(len(data)))]

    def fingerprint(self) -> str | None:
        """sha256 of the token ids this rank trains on (its shard, in shard order; ``None`` when streaming)."""
        self._ensure("fit")
        return self.record["sha256"]

    # ------------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the data record (the loader's position is saved by the loader)."""
        return {"record": dict(self.record)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.checkpoint_record = state_dict.get("record")
