"""Perplexity with an explicit, recorded protocol.

Perplexities are comparable only when the protocol is the same, so every number comes with its protocol
(:class:`PerplexityProtocol`, recorded in the result):

- **source**: a hub dataset (``datasets.load_dataset(source, dataset_config, split=split)``, column ``text_field``),
  a local file, directory or glob (``.txt``: each file one document; ``.jsonl`` / ``.json`` / ``.parquet``: the
  ``text_field`` of every row), or ``"stdlib"``: the bundled offline corpus (:mod:`pruning.text`, ``split``
  ``heldout`` or ``train``, one document per file); all read by :class:`pruning.text.TextReader`, empty texts kept.
- **joiner**: the documents are joined into one text with it (``"\\n\\n"``: the papers' WikiText-2 protocol).
- **tokenisation**: the joined text is tokenised once, without special tokens; ``tokenizer="bytes"`` gives its UTF-8
  bytes as ids 0..255 (byte-level models).
- **add_bos**: ``False`` (no BOS anywhere), ``"stream"`` (one BOS before the whole stream, which is what the papers'
  scripts get from Llama's tokenizer defaults) or ``True`` / ``"window"`` (BOS before every window, which then holds
  ``seq_len − 1`` text tokens and scores all of them).
- **windows**: ``seq_len`` tokens; ``stride`` (default ``seq_len``: non-overlapping) between window starts; only
  complete windows, from the start of the stream; at most ``max_windows``. With ``stride < seq_len`` only the last
  ``stride`` tokens of each window after the first are scored (Hugging Face's sliding-window recipe), so every token
  is scored once, with at least ``seq_len − stride`` tokens of context.
- **ppl** = ``exp(Σ NLL / scored tokens)`` (NLL of each next token, in float32 from the logits, summed in float64).

The default protocol is the papers' WikiText-2 protocol (SparseGPT, Wanda, LLM-Pruner, ...): ``wikitext`` /
``wikitext-2-raw-v1``, ``test`` split joined with ``"\\n\\n"``, non-overlapping 2048-token windows. The old
:func:`perplexity` (``[batch, seq]`` windows given by the caller) is kept for the demo and the report callback.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..text.reader import BUILDERS, TextReader, source_kind
from ..text.tokens import is_bytes_tokenizer, joined_ids, tokenizer_name
from .nll import IGNORE_INDEX, all_reduce_sums, summed_nll

__all__ = [
    "BOS_MODES",
    "IGNORE_INDEX",
    "LOCAL_SUFFIXES",
    "PRESETS",
    "PerplexityProtocol",
    "PerplexityResult",
    "evaluate_perplexity",
    "load_documents",
    "perplexity",
    "perplexity_windows",
    "score_windows",
    "token_stream",
]

BOS_MODES = ("none", "stream", "window")
LOCAL_SUFFIXES = tuple(BUILDERS)


def perplexity(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str | None = None) -> float:
    """Token-weighted perplexity of ``model`` on ``[batch, seq]`` token-id tensors (each window scored alone)."""
    nll, tokens = summed_nll(model, ({"input_ids": ids} for ids in batches), device)
    return math.exp(nll / tokens)


# --------------------------------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PerplexityProtocol:
    """How a perplexity is measured (see the module docstring); ``as_dict()`` is what results record.

    Args:
        source: hub dataset name, local file / glob (``.txt``, ``.jsonl``, ``.json``, ``.parquet``) or ``stdlib``.
        dataset_config: the hub dataset's configuration (e.g. ``wikitext-2-raw-v1``); ignored for other sources.
        split: hub split (``test``), or ``heldout`` / ``train`` for ``stdlib``; ignored for local files.
        text_field: column holding the text (hub, ``.jsonl``, ``.json``, ``.parquet``).
        joiner: string between documents.
        seq_len: tokens per window (model inputs, BOS included).
        stride: tokens between window starts (default: a full window's text, i.e. non-overlapping).
        add_bos: ``False`` / ``"none"``, ``"stream"``, or ``True`` / ``"window"``.
        max_windows: score only the first this many windows.
    """

    source: str = "wikitext"
    dataset_config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    text_field: str = "text"
    joiner: str = "\n\n"
    seq_len: int = 2048
    stride: int | None = None
    add_bos: bool | str = False
    max_windows: int | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"PerplexityProtocol: seq_len={self.seq_len} must be >= 2")
        _ = self.bos  # validates add_bos
        text = self.text_len
        if self.stride is not None and not 1 <= self.stride <= text:
            raise ValueError(
                f"PerplexityProtocol: stride={self.stride} must be in [1, {text}] (the text tokens of a "
                f"window: seq_len{' - 1 with add_bos=window' if self.bos == 'window' else ''}). "
                "HINT: leave stride unset for non-overlapping windows"
            )
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"PerplexityProtocol: max_windows={self.max_windows} must be >= 1 or null")

    @property
    def bos(self) -> str:
        """``add_bos`` as one of :data:`BOS_MODES`."""
        mode = {False: "none", True: "window", None: "none"}.get(self.add_bos, self.add_bos)  # type: ignore[arg-type]
        if mode not in BOS_MODES:
            raise ValueError(f"PerplexityProtocol: add_bos={self.add_bos!r} must be false, true, 'stream' or 'window'")
        return mode

    @property
    def text_len(self) -> int:
        """Text tokens per window: ``seq_len``, or ``seq_len − 1`` when every window starts with BOS."""
        return self.seq_len - (1 if self.bos == "window" else 0)

    @property
    def step(self) -> int:
        """The resolved stride."""
        return self.stride if self.stride is not None else self.text_len

    @property
    def kind(self) -> str:
        """``stdlib``, ``local`` or ``hub``."""
        return source_kind(self.source)

    def as_dict(self) -> dict[str, Any]:
        """Every field, with ``stride`` and ``add_bos`` resolved, the source kind, and fields that do not apply to the
        source set to ``None`` (what a result records)."""
        d = asdict(self)
        d.update(stride=self.step, add_bos=self.bos, source_kind=self.kind)
        if self.kind != "hub":
            d["dataset_config"] = None
        if self.kind == "local":
            d["split"] = None
        if self.kind == "stdlib" or (self.kind == "local" and BUILDERS.get(Path(self.source).suffix.lower()) == "text"):
            d["text_field"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PerplexityProtocol:
        """From a dict (config files); ``{"preset": "stdlib", "seq_len": 256}`` starts from a preset."""
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"preset", "stride", "source_kind"}
        if unknown:
            raise ValueError(
                f"PerplexityProtocol: unknown keys {sorted(unknown)}; allowed: {sorted(names)} and 'preset'"
            )
        d.pop("source_kind", None)
        preset = d.pop("preset", None)
        return cls.preset(preset, **d) if preset is not None else cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PerplexityProtocol:
        """A named protocol (:data:`PRESETS`: ``wikitext2``/``wikitext``, ``stdlib``) or, for anything else, a local
        file / hub dataset with the default protocol's windows; ``overrides`` replace fields."""
        base = dict(PRESETS[name]) if name in PRESETS else {"source": name, "dataset_config": None}
        if name not in PRESETS and source_kind(name) == "hub":
            base["split"] = "test"
        base.update(overrides)
        return cls(**base)


#: Named protocols. ``wikitext2``: the papers' (non-overlapping 2048-token windows of the joined WikiText-2 test
#: split). ``stdlib``: the offline demo's (the held-out stdlib split, first 128 windows of 128 bytes).
PRESETS: dict[str, dict[str, Any]] = {
    "wikitext2": {},
    "wikitext": {},
    "stdlib": {"source": "stdlib", "dataset_config": None, "split": "heldout", "seq_len": 128, "max_windows": 128},
}


# --------------------------------------------------------------------------------------------------------------------
# text -> token stream -> windows
# --------------------------------------------------------------------------------------------------------------------


def load_documents(protocol: PerplexityProtocol) -> list[str] | list[bytes]:
    """The documents of the protocol's source, in order (``bytes`` for ``stdlib``, ``str`` otherwise; empty and null
    texts kept as ``""``: they still add a joiner)."""
    p = protocol
    reader = TextReader(
        p.source, p.split, dataset_config=p.dataset_config, text_field=p.text_field, keep_empty=True, owner="perplexity"
    )
    return list(reader.documents())  # type: ignore[return-value]


def token_stream(
    protocol: PerplexityProtocol, tokenizer: Any = "bytes", documents: Sequence[str] | Sequence[bytes] | None = None
) -> torch.Tensor:
    """The protocol's token stream (1-D ``long``): documents joined with ``joiner``, tokenised without special
    tokens (``"bytes"``: UTF-8 bytes), with one BOS in front for ``add_bos="stream"``."""
    if is_bytes_tokenizer(tokenizer) and protocol.bos != "none":
        raise ValueError(
            f"add_bos={protocol.add_bos!r} with tokenizer='bytes': the bytes tokenizer has no BOS. HINT: add_bos: false"
        )
    bos_id = _bos_id(tokenizer) if protocol.bos == "stream" else None
    docs = load_documents(protocol) if documents is None else documents
    return joined_ids(docs, tokenizer, protocol.joiner, bos_id)


def _bos_id(tokenizer: Any) -> int:
    if is_bytes_tokenizer(tokenizer) or getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError("add_bos needs a tokenizer with a BOS token. HINT: add_bos: false")
    return int(tokenizer.bos_token_id)


def perplexity_windows(
    stream: torch.Tensor, protocol: PerplexityProtocol, bos_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both ``[windows, seq_len]``: labels are the inputs with ``-100`` at positions not
    scored (the model shifts: position ``t`` is predicted from positions ``< t``)."""
    p = protocol
    text, step = p.text_len, p.step
    n = 0 if stream.numel() < text else (stream.numel() - text) // step + 1
    if p.max_windows is not None:
        n = min(n, p.max_windows)
    if n == 0:
        raise ValueError(
            f"perplexity: the token stream has {stream.numel()} tokens, fewer than one window of {text}. "
            "HINT: lower seq_len or use more text"
        )
    starts = torch.arange(n) * step
    body = stream[starts[:, None] + torch.arange(text)[None, :]]
    labels = body.clone()
    if n > 1 and step < text:  # sliding: later windows score only their last `stride` tokens
        labels[1:, : text - step] = IGNORE_INDEX
    if p.bos == "window":
        if bos_id is None:
            raise ValueError("add_bos='window' needs bos_id")
        col = torch.full((n, 1), bos_id, dtype=torch.long)
        return torch.cat([col, body], 1), torch.cat([torch.full_like(col, IGNORE_INDEX), labels], 1)
    labels[:, 0] = IGNORE_INDEX  # nothing before it to predict it from
    return body, labels


def score_windows(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """``(Σ NLL, scored tokens)`` of ``model`` on the windows, ``batch_size`` at a time (:func:`summed_nll`: NLL in
    float32, summed in float64)."""
    starts = range(0, input_ids.shape[0], batch_size)
    batches = ({"input_ids": input_ids[i : i + batch_size], "labels": labels[i : i + batch_size]} for i in starts)
    return summed_nll(model, batches, device)


# --------------------------------------------------------------------------------------------------------------------
# the function
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PerplexityResult:
    """A perplexity and how it was measured."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    protocol: dict[str, Any]
    tokenizer: str
    stream_tokens: int
    sha256: str  # of the scored windows' token ids (int64, row-major): same number => same inputs
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any = "bytes",
    protocol: PerplexityProtocol | dict[str, Any] | str | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    distributed: bool = False,
    stream: torch.Tensor | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` under ``protocol`` (default: the papers' WikiText-2 protocol; a string names a
    preset, a local file or a hub dataset, see :meth:`PerplexityProtocol.preset`).

    Args:
        model: a causal LM returning ``.logits`` (masked or compacted; its training mode is restored afterwards).
        tokenizer: a Hugging Face tokenizer or ``"bytes"`` (UTF-8 bytes as ids 0..255).
        batch_size: windows per forward.
        device: where the inputs go (default: the model's first parameter's device).
        distributed: with a process group initialised, window ``i`` is scored by rank ``i % world`` and the sums are
            all-reduced (every rank must call this); the result equals the single-process one.
        stream: the token stream, if already built (:func:`token_stream`), to skip loading and tokenising.
    """
    if protocol is None:
        protocol = PerplexityProtocol()
    elif isinstance(protocol, str):
        protocol = PerplexityProtocol.preset(protocol)
    elif isinstance(protocol, dict):
        protocol = PerplexityProtocol.from_dict(protocol)
    ids = token_stream(protocol, tokenizer) if stream is None else stream
    bos_id = _bos_id(tokenizer) if protocol.bos == "window" else None
    inputs, labels = perplexity_windows(ids, protocol, bos_id)
    digest = hashlib.sha256(inputs.to(torch.int64).numpy().tobytes()).hexdigest()
    rank, world = 0, 1
    if distributed and dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    nll, tokens = score_windows(model, inputs[rank::world], labels[rank::world], batch_size, device)
    if world > 1:
        nll, tokens = all_reduce_sums(nll, tokens, next(model.parameters()).device)
    ppl = math.exp(nll / tokens) if tokens else float("nan")
    return PerplexityResult(
        ppl=ppl,
        nll=nll,
        tokens=tokens,
        windows=int(inputs.shape[0]),
        protocol=protocol.as_dict(),
        tokenizer=tokenizer_name(tokenizer),
        stream_tokens=int(ids.numel()),
        sha256=digest,
    )
