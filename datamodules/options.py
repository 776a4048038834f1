"""The TextDataModule's arguments: their checks (a bad config fails in ``__init__``, with a hint), the readers of
its splits, and its tokenizer."""

from __future__ import annotations

from typing import Any

from pruning.text.instruct import INSTRUCT_FIELDS
from pruning.text.reader import TextReader, invalid

__all__ = [
    "DEFAULT_WINDOWS",
    "MODES",
    "SAMPLE_BY",
    "STDLIB_MAX_BYTES",
    "WINDOW_POOL",
    "check_integers",
    "check_source",
    "check_tokenizer",
    "invalid_argument",
    "load_tokenizer",
    "split_reader",
]

MODES = ("packed", "windows", "instruct")
SAMPLE_BY = ("document", "paragraph", "line")
DEFAULT_WINDOWS = 128
STDLIB_MAX_BYTES = 4_000_000  # the stdlib corpus's default cap (the demo's size)
WINDOW_POOL = 8  # uncapped sources: windows are drawn from the first 8 × N × L tokens


def invalid_argument(key: str, value: Any, allowed: str, hint: str | None = None) -> ValueError:
    """A bad TextDataModule argument: the value, what is allowed, and what to change."""
    hint = hint or f"set `{key}` under `data:` in the config (TextDataModule({key}=...))."
    return invalid("TextDataModule", key, value, allowed, hint)


def check_source(source: Any, mode: Any, sample_by: Any, text_field: Any, instruct_fields: Any, val_split: Any) -> None:
    """The arguments that say what is read and how."""
    if not isinstance(source, str) or not source:
        raise invalid_argument("source", source, "'stdlib', a local file/directory/glob or a hub dataset name")
    if mode not in MODES:
        raise invalid_argument("mode", mode, str(list(MODES)))
    if sample_by not in SAMPLE_BY:
        raise invalid_argument("sample_by", sample_by, str(list(SAMPLE_BY)))
    if not isinstance(text_field, str) or not text_field:
        raise invalid_argument("text_field", text_field, "a column name")
    if instruct_fields is not None and (
        not isinstance(instruct_fields, dict)
        or not set(instruct_fields) <= set(INSTRUCT_FIELDS)
        or not all(isinstance(v, str) and v for v in instruct_fields.values())
    ):
        raise invalid_argument(
            "instruct_fields", instruct_fields, f"null or a map from some of {list(INSTRUCT_FIELDS)} to column names"
        )
    if val_split is not None and (not isinstance(val_split, str) or not val_split):
        raise invalid_argument("val_split", val_split, "null or a split name")


def check_integers(at_least: dict[str, tuple[Any, int]], optional: dict[str, Any]) -> None:
    """``at_least``: ``{key: (value, lowest)}``, integers; ``optional``: ``{key: value}``, null or an integer >= 1."""
    for key, (value, low) in at_least.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise invalid_argument(key, value, f"an integer >= {low}")
    for key, value in optional.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise invalid_argument(key, value, "null or an integer >= 1")


def check_tokenizer(tokenizer: Any, add_bos: bool | None) -> str:
    """The tokenizer argument, null resolved to ``"model"``."""
    tokenizer = "model" if tokenizer is None else tokenizer
    if not isinstance(tokenizer, str) or not tokenizer:
        raise invalid_argument("tokenizer", tokenizer, "'bytes', 'model' or a tokenizer name / path")
    if tokenizer == "bytes" and add_bos:
        raise invalid_argument(
            "add_bos",
            add_bos,
            "false or null with tokenizer='bytes'",
            "the bytes tokenizer has no BOS token; set `add_bos: false` or pick another `tokenizer`.",
        )
    return tokenizer


def split_reader(source: str, split: str, key: str, split_key: str, mode: str, **options: Any) -> TextReader:
    """The shared reader of one split, with what the DataModule's modes need of it checked now (a bad config fails
    before any training starts)."""
    reader = TextReader(
        source, split, instruct=mode == "instruct", owner="TextDataModule", key=key, split_key=split_key, **options
    )
    if reader.kind == "stdlib" and mode == "instruct":
        raise invalid_argument(
            "mode",
            "instruct",
            "'packed' or 'windows' for the stdlib corpus",
            "instruct needs rows with instruction/input/output: set `source` to such a "
            ".json/.jsonl/.parquet file or hub dataset, or `mode` to 'packed'.",
        )
    if reader.kind == "local" and split != "train":
        raise invalid_argument(
            split_key,
            split,
            "'train' for local files",
            f"local files form the single split 'train': set `{split_key}: train`, and give "
            "held-out files with `val_source`.",
        )
    if reader.kind == "local" and reader.builder == "text" and mode == "instruct":
        raise invalid_argument(
            "mode",
            "instruct",
            "'packed' or 'windows' for .txt files",
            "instruct needs .json/.jsonl/.parquet rows with instruction/input/output: fix "
            "`source`, or set `mode: packed`.",
        )
    return reader


def load_tokenizer(name: str, module: Any, trust_remote_code: bool) -> Any:
    """The Hugging Face tokenizer named by the ``tokenizer`` argument (``None`` for ``"bytes"``); ``"model"``: the
    LightningModule's ``tokenizer`` attribute (an object, a name or ``"bytes"``)."""
    tok: Any = None
    if name == "model":
        tok = getattr(module, "tokenizer", None)
        if tok is None:
            raise invalid_argument(
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
    if not isinstance(tok, str):
        return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tok, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise invalid_argument(
            "tokenizer",
            name,
            "'bytes', 'model' or a loadable tokenizer name / path",
            f"{tok!r} could not be loaded ({type(err).__name__}: {str(err)[:200]}); fix `data.tokenizer`.",
        ) from err
