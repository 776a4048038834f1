"""Text for calibration, training and evaluation: the one reader of sources (the offline standard-library corpus,
local files, hub datasets), the one encoding of documents to token ids (bytes or a Hugging Face tokenizer), the
Alpaca prompt, and token windows."""

from .instruct import alpaca_prompt
from .reader import BUILDERS, SourceNotFoundError, TextReader, local_files, source_kind
from .stdlib import BYTE_VOCAB, batches, stdlib_bytes, stdlib_files, stdlib_root, windows
from .tokens import Encoder, byte_tokenizer, encode, joined_ids, packed_stream

__all__ = [
    "BUILDERS",
    "BYTE_VOCAB",
    "Encoder",
    "SourceNotFoundError",
    "TextReader",
    "alpaca_prompt",
    "batches",
    "byte_tokenizer",
    "encode",
    "joined_ids",
    "local_files",
    "packed_stream",
    "source_kind",
    "stdlib_bytes",
    "stdlib_files",
    "stdlib_root",
    "windows",
]
