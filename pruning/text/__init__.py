"""Text for calibration, training and evaluation: the one reader of sources (the offline standard-library corpus,
local files, hub datasets), the Alpaca prompt, and token windows."""

from .instruct import alpaca_prompt
from .reader import BUILDERS, SourceNotFoundError, TextReader, local_files, source_kind
from .stdlib import BYTE_VOCAB, batches, stdlib_bytes, stdlib_files, stdlib_root, windows

__all__ = [
    "BUILDERS",
    "BYTE_VOCAB",
    "SourceNotFoundError",
    "TextReader",
    "alpaca_prompt",
    "batches",
    "local_files",
    "source_kind",
    "stdlib_bytes",
    "stdlib_files",
    "stdlib_root",
    "windows",
]
