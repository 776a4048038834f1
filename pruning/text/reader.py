"""The one reader of text: the offline stdlib corpus, local files and Hugging Face hub datasets, as documents.

Sources
    ``"stdlib"``: the bundled offline corpus (:mod:`pruning.text.stdlib`), split into ``train`` and ``heldout`` by
    file, one ``bytes`` document per file. A local file, directory (searched recursively) or glob, or a list of
    them: ``.txt`` / ``.text`` / ``.md`` (``sample_by``: one document per file, paragraph or line), ``.json`` /
    ``.jsonl`` or ``.parquet`` rows, read with ``datasets.load_dataset("text" | "json" | "parquet",
    data_files=..., streaming=True)`` (nothing converted or cached; a cap stops the reading early); local files form
    the single split ``train``. Anything else names a hub dataset: ``datasets.load_dataset(name, dataset_config,
    split=...)``.

Documents
    ``bytes`` (stdlib), ``str`` (a row's ``text_field``, or a text file's document) or, with ``instruct``,
    ``(prompt, response)``: Alpaca rows (``instruction``, optional ``input``, ``output``) in the Stanford Alpaca
    prompt (:mod:`pruning.text.instruct`). The DataModule, the perplexity protocol and the ``search`` / ``rank``
    command lines all read through :class:`TextReader`; ``datasets`` is imported only when rows are read.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from .instruct import INSTRUCT_FIELDS, alpaca_prompt
from .stdlib import stdlib_files

__all__ = [
    "BUILDERS",
    "READ_CHUNK",
    "STDLIB_SPLITS",
    "SourceNotFoundError",
    "TextReader",
    "chunks",
    "invalid",
    "limited",
    "local_files",
    "looks_local",
    "source_kind",
]

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
STDLIB_SPLITS = ("train", "heldout")
STREAM_SHUFFLE_BUFFER = 1000  # documents
READ_CHUNK = 256  # rows read (and documents tokenised) at once

Document = bytes | str | tuple[str, str]


class SourceNotFoundError(FileNotFoundError, ValueError):
    """A local source that names no file: a ``FileNotFoundError`` and, like every bad argument, a ``ValueError``."""


def invalid(owner: str, key: str, value: Any, allowed: str, hint: str, error: type[ValueError] = ValueError):
    """The project's bad-argument error: the value, what is allowed, and a hint of what to change."""
    return error(f"{owner}: {key}={value!r} is not allowed; allowed: {allowed}. HINT: {hint}")


def looks_local(source: str) -> bool:
    """Whether ``source`` names a path rather than a hub dataset (a path prefix, a known suffix, or it exists)."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or Path(source).suffix.lower() in BUILDERS
        or os.path.exists(os.path.expanduser(source))
    )


def _is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def source_kind(source: str | Sequence[str]) -> Literal["stdlib", "local", "hub"]:
    """``stdlib``, ``local`` (a path, glob or list of paths) or ``hub``."""
    if isinstance(source, str) and source == "stdlib":
        return "stdlib"
    if not isinstance(source, str) or _is_glob(source) or looks_local(source):
        return "local"
    return "hub"


def local_files(source: str | Sequence[str]) -> list[str] | None:
    """Files named by a local path, directory or glob (sorted), or by a list of them (in the list's order);
    ``None`` when ``source`` names no local path."""
    if not isinstance(source, str):
        return [f for s in source for f in local_files(s) or []]
    expanded = os.path.expanduser(source)
    if _is_glob(source):
        return sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
    path = Path(expanded)
    if path.is_dir():
        return sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS)
    if path.is_file():
        return [str(path)]
    return [] if looks_local(source) else None


@functools.cache
def _decodes(path: str) -> bool:
    """Whether a file is valid UTF-8 (read in chunks, so a large file is not held whole)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _stdlib_split(split: str) -> tuple[Path, ...]:
    """:func:`pruning.text.stdlib_files`, walked once per process (the walk costs most of the reading time)."""
    return tuple(stdlib_files(split))  # type: ignore[arg-type]


def _document_bytes(doc: Document) -> int:
    if isinstance(doc, bytes):
        return len(doc)
    if isinstance(doc, str):
        return len(doc.encode("utf-8"))
    return sum(len(part.encode("utf-8")) for part in doc)


def limited(docs: Iterable[Document], max_bytes: int | None, max_documents: int | None) -> Iterator[Document]:
    """The documents up to and including the one that reaches ``max_bytes`` bytes of text or ``max_documents``."""
    total = 0
    for n, doc in enumerate(docs, 1):
        yield doc
        total += _document_bytes(doc)
        if (max_documents is not None and n >= max_documents) or (max_bytes is not None and total >= max_bytes):
            return


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class TextReader:
    """The documents of one split of one source, in a stable order (picklable: DataLoader workers reopen it).

    Args:
        source: ``"stdlib"``, a local file / directory / glob (or a list of them) or a hub dataset name.
        split: ``train`` / ``heldout`` for stdlib, any split of a hub dataset; local files have only ``train`` (the
            value is not used for them).
        dataset_config: the hub dataset's configuration name; not used otherwise.
        text_field: the column holding the text (json/parquet/hub rows; text files have ``text``).
        instruct: documents are ``(prompt, response)`` of Alpaca rows instead of ``text_field``.
        instruct_fields: the columns of ``instruction`` / ``input`` / ``output`` when not those names.
        sample_by: text files: one document per ``document`` (file), ``paragraph`` or ``line``.
        builder: read every local file with this ``datasets`` builder whatever its suffix (``text``: any text file).
        encoding_errors: text files: ``open(errors=...)`` (default: strict).
        streaming: read a hub dataset as a stream (local files are always streamed).
        cache_dir: the ``datasets`` cache directory (hub datasets).
        keep_empty: yield empty / null texts as ``""`` instead of skipping them.
        missing_text: rows whose text is missing or null (not an empty string): ``error`` (default: a jsonl with half
            its rows lacking the field would otherwise train on half the data) or ``skip`` (counted in
            :attr:`skipped`). Not used with ``keep_empty``.
        owner, key, split_key: who reads, and the names of its source and split arguments, for error messages.
    """

    def __init__(
        self,
        source: str | Sequence[str],
        split: str = "train",
        *,
        dataset_config: str | None = None,
        text_field: str = "text",
        instruct: bool = False,
        instruct_fields: dict[str, str] | None = None,
        sample_by: Literal["document", "paragraph", "line"] = "document",
        builder: Literal["text", "json", "parquet"] | None = None,
        encoding_errors: str | None = None,
        streaming: bool = False,
        cache_dir: str | None = None,
        keep_empty: bool = False,
        missing_text: Literal["error", "skip"] = "error",
        owner: str = "TextReader",
        key: str = "source",
        split_key: str = "split",
    ):
        self.source, self.split, self.dataset_config = source, split, dataset_config
        self.text_field, self.instruct, self.instruct_fields = text_field, instruct, instruct_fields or {}
        self.sample_by, self.encoding_errors = sample_by, encoding_errors
        self.streaming, self.cache_dir, self.keep_empty = streaming, cache_dir, keep_empty
        if missing_text not in ("error", "skip"):
            raise invalid(owner, "missing_text", missing_text, "'error' or 'skip'", "set it to one of those.")
        self.missing_text = missing_text
        self.skipped = 0  # rows without text skipped (missing_text='skip'), in this process
        self.owner, self.key = owner, key
        self.kind = source_kind(source)
        self.files: list[str] | None = None
        self.builder = builder
        if self.kind == "stdlib":
            if split not in STDLIB_SPLITS:
                raise self.invalid(
                    split_key,
                    split,
                    str(list(STDLIB_SPLITS)),
                    f"the stdlib corpus has the splits 'train' and 'heldout': fix `{split_key}`.",
                )
        elif self.kind == "local":
            self.files = self._files()
            self.builder = builder or self._builder()

    def invalid(self, key: str, value: Any, allowed: str, hint: str, error: type[ValueError] = ValueError):
        """A bad-argument error in the reader's owner's name."""
        return invalid(self.owner, key, value, allowed, hint, error)

    def _files(self) -> list[str]:
        files = local_files(self.source)
        if not files:
            raise self.invalid(
                self.key,
                self.source,
                "'stdlib', an existing file, directory or glob, or a hub dataset name",
                f"no file matches `{self.key}`={self.source!r}; check the path (relative to {os.getcwd()}).",
                SourceNotFoundError,
            )
        return files

    def _builder(self) -> str:
        kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in self.files}
        if None in kinds or len(kinds) != 1:
            unknown = [f for f in self.files if Path(f).suffix.lower() not in BUILDERS]
            raise self.invalid(
                self.key,
                self.files[:5],
                f"files of one kind among {sorted(BUILDERS)}",
                f"point `{self.key}` at .txt, .json/.jsonl or .parquet files, not a mixture"
                + (f" ({unknown[:3]} are none of these)." if unknown else "."),
            )
        return kinds.pop()

    def describe(self) -> str:
        """The source, with the number of files for local ones."""
        return str(self.source) if self.kind != "local" else f"{self.source} ({len(self.files)} files)"

    def _dataset(self):
        import datasets

        if self.kind == "local":
            kwargs: dict[str, Any] = {}
            if self.builder == "text":
                kwargs["sample_by"] = self.sample_by
                if self.encoding_errors is not None:
                    kwargs["encoding_errors"] = self.encoding_errors
            # Local files are always read as a stream: nothing is converted or cached, and a byte cap stops early.
            return datasets.load_dataset(
                self.builder, data_files=self.files, split="train", streaming=True, cache_dir=self.cache_dir, **kwargs
            )
        return datasets.load_dataset(
            self.source, self.dataset_config, split=self.split, streaming=self.streaming, cache_dir=self.cache_dir
        )

    def prepare(self) -> None:
        """Download (hub sources, not streamed) once, so that ranks do not all download at the same time."""
        if self.kind == "hub" and not self.streaming:
            self._dataset()

    def documents(
        self,
        shuffle_seed: int | None = None,
        shard: tuple[int, int] | None = None,
        max_bytes: int | None = None,
        max_documents: int | None = None,
    ) -> Iterator[Document]:
        """Documents in source order (or shuffled with ``shuffle_seed``), up to the caps (counted over the whole
        split), and of those only the ones dealt to ``shard = (index, count)``: document ``d`` goes to
        ``d % count``. Uncapped hub/local data is dealt by ``datasets.distributed.split_dataset_by_node`` instead
        (whole shards, i.e. files, when their number divides ``count``), so a stream reads only its own part."""
        capped = max_bytes is not None or max_documents is not None
        if shard is not None and not capped and self.kind != "stdlib":
            from datasets.distributed import split_dataset_by_node

            yield from self._rows(
                split_dataset_by_node(self._shuffled(shuffle_seed), rank=shard[0], world_size=shard[1])
            )
            return
        docs = self._stdlib(shuffle_seed) if self.kind == "stdlib" else self._rows(self._shuffled(shuffle_seed))
        docs = limited(docs, max_bytes, max_documents)
        if shard is None:
            yield from docs
        else:
            yield from (d for i, d in enumerate(docs) if i % shard[1] == shard[0])

    def _stdlib(self, shuffle_seed: int | None) -> Iterator[bytes]:
        files = list(_stdlib_split(self.split))
        if shuffle_seed is not None:
            order = torch.randperm(len(files), generator=torch.Generator().manual_seed(shuffle_seed))
            files = [files[i] for i in order.tolist()]
        for f in files:
            yield f.read_bytes()

    def _shuffled(self, shuffle_seed: int | None):
        ds = self._dataset()
        if shuffle_seed is not None:
            import datasets

            if isinstance(ds, datasets.IterableDataset):
                ds = ds.shuffle(seed=shuffle_seed, buffer_size=STREAM_SHUFFLE_BUFFER)
            else:
                ds = ds.shuffle(seed=shuffle_seed)
        return ds

    def _rows(self, ds) -> Iterator[str | tuple[str, str]]:
        # ``.iter`` rather than ``for row in ds``: inside a DataLoader worker, iterating a streamed dataset directly
        # would let ``datasets`` shard it by worker on top of the sharding done here.
        for batch in self._batches(ds):
            columns = list(batch)
            for i in range(len(batch[columns[0]]) if columns else 0):
                doc = self._document({c: batch[c][i] for c in columns})
                if doc:
                    yield doc
                elif self.keep_empty:
                    yield ""

    def _batches(self, ds) -> Iterator[dict]:
        """The rows of ``ds`` in chunks; a text file that is not UTF-8 is named in the error."""
        try:
            yield from ds.iter(batch_size=READ_CHUNK)
        except UnicodeDecodeError as err:
            raise self._not_utf8(err) from err

    def _not_utf8(self, err: UnicodeDecodeError) -> ValueError:
        bad = next((f for f in self.files or () if not _decodes(f)), None)
        where = f"{bad!r}" if bad is not None else self.describe()
        return self.invalid(
            self.key,
            self.source,
            "UTF-8 text",
            f"{where} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8, or read it with "
            "encoding_errors: replace.",
        )

    def _column(self, row: dict, field: str) -> str | None:
        names = (self.instruct_fields[field],) if field in self.instruct_fields else INSTRUCT_FIELDS[field]
        return next((n for n in names if n in row), None)

    def _document(self, row: dict) -> str | tuple[str, str] | None:
        if self.instruct:
            cols = {f: self._column(row, f) for f in INSTRUCT_FIELDS}
            missing = [f for f in ("instruction", "output") if cols[f] is None]
            if missing:
                raise self.invalid(
                    "instruct_fields",
                    self.instruct_fields or None,
                    "a map from 'instruction', 'input', 'output' to columns of the rows",
                    f"{self.describe()} has the columns {sorted(row)}, none found for {missing}: set "
                    "`instruct_fields`, e.g. {output: response}, or `mode: packed` and `text_field`.",
                )
            inp = row[cols["input"]] if cols["input"] is not None else ""
            return alpaca_prompt(row[cols["instruction"]] or "", inp or ""), row[cols["output"]] or ""
        if self.text_field not in row:
            raise self.invalid(
                "text_field",
                self.text_field,
                f"a column of {self.describe()}: {sorted(row)}",
                "set `text_field` to the column holding the text.",
            )
        text = row[self.text_field]
        if text is None and not self.keep_empty:
            if self.missing_text == "error":
                raise self.invalid(
                    "text_field",
                    self.text_field,
                    f"a column every row of {self.describe()} has",
                    f"a row has no {self.text_field!r} (missing or null; its columns: {sorted(row)}), and skipping "
                    "it would train on less data than given. Fix the data, or set `missing_text: skip` to skip such "
                    "rows (their count is recorded).",
                )
            self.skipped += 1
        elif text is not None and not isinstance(text, str):
            raise self.invalid(
                "text_field",
                self.text_field,
                "a column of strings",
                f"{self.describe()}'s {self.text_field!r} holds {type(text).__name__} values (e.g. {text!r:.60}); "
                "point `text_field` at the text column.",
            )
        return text
