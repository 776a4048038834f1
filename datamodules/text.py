"""``TextDataModule``: calibration and recovery-training text for pruning runs, as a Lightning DataModule.

Sources
    ``"stdlib"`` (the bundled offline corpus: the Python standard library's source, split into ``train`` and
    ``heldout`` by file, see :mod:`pruning.text`), a local file / directory / glob of ``.txt``, ``.json``, ``.jsonl``
    or ``.parquet`` files (read with ``datasets.load_dataset("text" | "json" | "parquet", data_files=...)``), or the
    name of a dataset on the Hugging Face hub (``datasets.load_dataset(name, dataset_config, split=...)``); all read
    by :class:`pruning.text.TextReader`, tokenised by :class:`pruning.text.tokens.Encoder`.

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

Sharding between ranks and exact resumption: :mod:`.sampling`; streamed training data: :mod:`.streaming`.
"""

from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from pruning.pipeline.oneshot import calibration_fingerprint
from pruning.text.instruct import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, alpaca_prompt
from pruning.text.reader import TextReader
from pruning.text.tokens import IGNORE_INDEX, Encoder

from .options import (
    STDLIB_MAX_BYTES,
    check_integers,
    check_source,
    check_tokenizer,
    invalid_argument,
    load_tokenizer,
    split_reader,
)
from .sampling import Position, ResumableDataLoader, ShardSampler
from .sequences import InMemorySplit, Sequences, held_out_sequences
from .streaming import StreamDataset

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE_INDEX",
    "ResumableDataLoader",
    "TextDataModule",
    "alpaca_prompt",
]


class TextDataModule(LightningDataModule):
    """Calibration and recovery-training text: packed documents, seeded windows or Alpaca instructions.

    Batches are dicts of ``LongTensor[B, L]``: ``input_ids``, ``labels`` (``input_ids`` with −100 where no loss is
    taken; the model shifts them) and, when padding exists (``mode='instruct'`` without packing),
    ``attention_mask``. After :meth:`setup`, :attr:`record` describes the data this rank trains on (source, split,
    mode, sizes, sha256 of its token ids, world size, ...). Sharding and resumption: :mod:`.sampling`.

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
        missing_text: Rows whose `text_field` is missing or null: ``"error"`` (refused: skipping them silently
            would train on less data than given) or ``"skip"`` (skipped and counted in ``record``).
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
        missing_text: Literal["error", "skip"] = "error",
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
        check_source(source, mode, sample_by, text_field, instruct_fields, val_split)
        check_integers(
            {"seq_len": (seq_len, 2), "batch_size": (batch_size, 1), "calibration_samples": (calibration_samples, 1)}
            | {"val_samples": (val_samples, 0), "num_workers": (num_workers, 0), "seed": (seed, 0)},
            {"num_samples": num_samples, "steps_per_epoch": steps_per_epoch}
            | {"max_bytes": max_bytes, "max_documents": max_documents},
        )
        tokenizer = check_tokenizer(tokenizer, add_bos)

        self.source, self.dataset_config, self.train_split = source, dataset_config, train_split
        self.val_source = val_source
        self.val_split = (
            val_split
            if val_split is not None
            else ("heldout" if (val_source or source) == "stdlib" else ("train" if val_source else None))
        )
        self.text_field, self.instruct_fields, self.sample_by = text_field, instruct_fields, sample_by
        self.missing_text = missing_text
        self.streaming, self.steps_per_epoch = streaming, steps_per_epoch
        self.tokenizer_name, self.trust_remote_code = tokenizer, trust_remote_code
        self.add_bos, self.add_eos = add_bos, add_eos
        self.mode, self.instruct_packing = mode, instruct_packing
        self.seq_len, self.batch_size, self.num_samples = seq_len, batch_size, num_samples
        self.val_samples, self.calibration_samples = val_samples, calibration_samples
        self.max_bytes, self.max_documents = max_bytes, max_documents
        self.num_workers, self.seed, self.cache_dir = num_workers, seed, cache_dir
        self.save_hyperparameters()

        # Readers check local paths and split names now, so a bad config fails before any training starts.
        self._train_reader = self._reader(source, train_split, "source", "train_split", dataset_config)
        self._val_reader = None
        if self.val_split is not None and val_samples > 0:
            key, config = ("val_source", None) if val_source else ("source", dataset_config)
            self._val_reader = self._reader(val_source or source, self.val_split, key, "val_split", config)

        self.tokenizer: Any = None  # the resolved Hugging Face tokenizer after setup (None for "bytes")
        self.record: dict[str, Any] = {}
        self.checkpoint_record: dict[str, Any] | None = None
        self._rank_override: tuple[int, int] | None = None
        self._dist: tuple[int, int] | None = None
        self._encoder: Encoder | None = None
        self._reset()

    @property
    def vocab_size(self) -> int | None:
        """How many token ids the tokenizer can give (``None`` before ``setup`` resolves it)."""
        return None if self._encoder is None else self._encoder.vocab_size

    def _reader(self, source: str, split: str, key: str, split_key: str, dataset_config: str | None) -> TextReader:
        return split_reader(
            source,
            split,
            key,
            split_key,
            self.mode,
            dataset_config=dataset_config,
            text_field=self.text_field,
            sample_by=self.sample_by,
            missing_text=self.missing_text,
            streaming=self.streaming,
            cache_dir=self.cache_dir,
            instruct_fields=self.instruct_fields,
        )

    def _reset(self) -> None:
        self._train: Sequences | None = None
        self._val: Sequences | None = None
        self._calibration: Sequences | None = None
        self._in_memory: InMemorySplit | None = None
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
        if self._encoder is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = load_tokenizer(self.tokenizer_name, module, self.trust_remote_code)
            self._encoder = Encoder(self.tokenizer, self.add_bos, self.add_eos, owner="TextDataModule")
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

    def _split(self) -> InMemorySplit:
        if self._in_memory is None:
            reader = self._train_reader
            self._in_memory = InMemorySplit(reader, self._encoder, self._caps(reader), self.seq_len, self.seed)
        return self._in_memory

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
        raise invalid_argument(
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
        every, info = self._split().training(self.mode, self.num_samples, self.instruct_packing, self._encoder.pad_id)
        if len(every) < world:
            raise invalid_argument(
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
        if self._train_reader.skipped:
            record["rows_without_text_skipped"] = self._train_reader.skipped
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
        seqs = held_out_sequences(
            reader, self._encoder, self._caps(reader), self.mode, self.seq_len, self.val_samples, self.instruct_packing
        )
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
            dataset = StreamDataset(
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
            return ResumableDataLoader(dataset, Position(self._steps), self._identity(), num_workers=self.num_workers)
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

    def _calibration_set(self, num_samples: int | None) -> Sequences:
        if self._dist is None:
            self._dist = self._rank_world()
        self._resolve_encoder()
        n = num_samples or self.calibration_samples
        if self._calibration is None or len(self._calibration) != n:
            self._calibration = self._split().windows(n)
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
