"""Token ids of documents, by one of two schemes: ``bytes`` (the UTF-8 bytes as ids 0..255: no download, the
vocabulary of byte-level models such as the demo's) or a Hugging Face tokenizer.

:func:`encode` is where text becomes ids for the DataModule, the perplexity protocol and the ``search`` / ``rank``
command lines: :class:`Encoder` frames documents and instruct examples with BOS / EOS for training
(:func:`packed_stream` joins them), :func:`joined_ids` tokenises documents joined into one text (the perplexity
protocol). :func:`byte_tokenizer` is the ``bytes`` scheme as a ``transformers`` tokenizer object, for code that needs
one (lm-eval, ``save_pretrained``); it gives the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..options import IGNORE_INDEX
from .reader import READ_CHUNK, chunks, invalid
from .stdlib import BYTE_VOCAB

__all__ = [
    "BYTES_SEPARATOR",
    "BYTE_EOS_ID",
    "IGNORE_INDEX",
    "Encoder",
    "byte_tokenizer",
    "bytes_to_unicode",
    "encode",
    "is_bytes_tokenizer",
    "joined_ids",
    "packed_stream",
    "tokenizer_name",
]


BYTES_SEPARATOR = b"\n\n"  # what the bytes scheme puts after every document (as pruning.text.stdlib_bytes)
BYTE_EOS_ID = 0  # NUL: never in text; lm-eval needs an EOS (prefix of empty contexts, stop of generation)


def is_bytes_tokenizer(tokenizer: Any) -> bool:
    """``None`` and ``"bytes"`` name the bytes scheme."""
    return tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "bytes")


def tokenizer_name(tokenizer: Any) -> str:
    """``bytes``, or the tokenizer's ``name_or_path`` (its class name when it has none)."""
    if is_bytes_tokenizer(tokenizer):
        return "bytes"
    return str(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


def _as_bytes(text: bytes | str) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def _as_text(text: bytes | str) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def encode(texts: Sequence[bytes | str], tokenizer: Any = None, special_tokens: bool = False) -> list[np.ndarray]:
    """The ids of every text: its UTF-8 bytes (``uint8``) for the bytes scheme, else the tokenizer's ``int64`` ids
    (``bytes`` texts decoded first, undecodable bytes replaced), with its special tokens only if ``special_tokens``."""
    if is_bytes_tokenizer(tokenizer):
        return [np.frombuffer(_as_bytes(t), dtype=np.uint8) for t in texts]
    out = tokenizer([_as_text(t) for t in texts], add_special_tokens=special_tokens, verbose=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in out]


def joined_ids(
    docs: Iterable[bytes | str],
    tokenizer: Any = None,
    joiner: str = "\n\n",
    bos_id: int | None = None,
    special_tokens: bool = False,
) -> torch.Tensor:
    """The documents joined with ``joiner`` into one text and tokenised once (1-D ``long``), with ``bos_id`` in
    front if given (the perplexity protocol's stream)."""
    if is_bytes_tokenizer(tokenizer):
        text: bytes | str = joiner.encode("utf-8").join(_as_bytes(d) for d in docs)
    else:
        text = joiner.join(_as_text(d) for d in docs)
    ids = encode([text], tokenizer, special_tokens)[0].astype(np.int64)
    if bos_id is not None:
        ids = np.concatenate([np.asarray([bos_id], np.int64), ids])
    return torch.from_numpy(ids)


class Encoder:
    """Token ids of training documents: byte-level ids 0..255 (``tokenizer=None``) or a Hugging Face tokenizer,
    each document framed as ``bos + ids + eos`` (bytes: no BOS, the separator ``"\\n\\n"`` as EOS).

    Args:
        tokenizer: a Hugging Face tokenizer, or ``None`` for bytes.
        add_bos: put BOS before every document; ``None``: as the tokenizer does by itself.
        add_eos: put EOS after every document and instruct response.
        owner: who encodes, for error messages.
    """

    def __init__(
        self, tokenizer: Any = None, add_bos: bool | None = None, add_eos: bool = True, owner: str = "Encoder"
    ):
        self.tokenizer = tokenizer
        if tokenizer is None:
            if add_bos:
                raise invalid(
                    owner,
                    "add_bos",
                    add_bos,
                    "False or null with tokenizer='bytes'",
                    "the bytes tokenizer has no BOS token; set `add_bos: false` or use a real tokenizer.",
                )
            self.name, self.vocab_size = "bytes", BYTE_VOCAB
            self.bos: list[int] = []
            self.eos = list(BYTES_SEPARATOR) if add_eos else []
            self.pad_id = 0
            return
        self.name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        self.vocab_size = len(tokenizer)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if add_bos is None:  # do what the tokenizer does by itself
            probe = tokenizer("a")["input_ids"]
            add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        if add_bos and bos is None:
            hint = "set `add_bos` to false or null, or use a tokenizer with a BOS token."
            raise invalid(owner, "add_bos", add_bos, "False or null: the tokenizer has no BOS token", hint)
        if add_eos and eos is None:
            hint = "set `add_eos` to false, or use a tokenizer with an EOS token."
            raise invalid(owner, "add_eos", add_eos, "False: the tokenizer has no EOS token", hint)
        self.bos = [bos] if add_bos else []
        self.eos = [eos] if add_eos else []
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos if eos is not None else 0)

    def ids(self, texts: Sequence[bytes | str]) -> list[np.ndarray]:
        """The ids of every text, without BOS / EOS (:func:`encode`)."""
        return encode(texts, self.tokenizer)

    def documents(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
        """``bos + ids + eos`` for every document."""
        if self.tokenizer is None:  # one bytes object per document: the fast path for the stdlib corpus
            return encode([_as_bytes(d) + bytes(self.eos) for d in docs])
        bos, eos = np.asarray(self.bos, np.int64), np.asarray(self.eos, np.int64)
        return [np.concatenate([bos, ids, eos]) for ids in self.ids(docs)]

    def examples(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(ids, labels)`` per (prompt, response): ``bos + prompt`` labelled −100, ``response + eos`` labelled.

        Prompt and response are tokenised apart, so the boundary between them is exact."""
        prompts = self.ids([p for p, _ in pairs])
        responses = self.ids([r for _, r in pairs])
        bos, eos = np.asarray(self.bos, np.int64), np.asarray(self.eos, np.int64)
        out = []
        for p, r in zip(prompts, responses):
            prompt = np.concatenate([bos, p.astype(np.int64)])
            response = np.concatenate([r.astype(np.int64), eos])
            labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX, np.int64), response])
            out.append((np.concatenate([prompt, response]), labels))
        return out


def packed_stream(docs: Iterable, encoder: Encoder, max_tokens: int | None = None) -> np.ndarray:
    """The packed token stream of ``docs`` (each ``bos + doc + eos``; instruct rows as prompt + response), cut at
    ``max_tokens``."""
    parts, total = [], 0
    for chunk in chunks(docs, READ_CHUNK):
        if isinstance(chunk[0], tuple):  # instruct rows: the whole example as text
            chunk = [p + r for p, r in chunk]
        for ids in encoder.documents(chunk):
            parts.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return stream[:max_tokens] if max_tokens is not None else stream


# --------------------------------------------------------------------------------------------------------------------
# the bytes scheme as a transformers tokenizer
# --------------------------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (what a ByteLevel tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A ``transformers`` fast tokenizer whose ids are the UTF-8 byte values 0..255 (what :mod:`pruning.text` and the
    ``bytes`` tokenizer of the DataModule feed byte-level models), built offline with no download.

    No BOS is added; EOS = pad = id 0 (the NUL byte, absent from text), so every id stays inside a 256-entry
    vocabulary. ``split_special_tokens`` is on: text is always encoded as its bytes (a literal ``"Ā"``, the printable
    stand-in of byte 0, still encodes as ``[196, 128]``). ``decode`` gives the text back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    special = b2u[BYTE_EOS_ID]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=special,
        pad_token=special,
        split_special_tokens=True,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )
    tok.name_or_path = "bytes"
    return tok
