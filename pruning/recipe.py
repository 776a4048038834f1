"""One-shot pruning from a recipe: a YAML file that ``pruning prune --config recipe.yaml`` runs and that Python reads
the same way (``pruning.Recipe.load("recipe.yaml").run()`` or ``pruning.prune_recipe("recipe.yaml")``).

A recipe reads top to bottom: the ``model`` (a local path or hub name, its dtype, the device the calibration runs
on), the ``calibration`` data (any source :class:`pruning.text.TextReader` reads, its tokenizer, ``num_samples``
windows of ``seq_len`` tokens at seeded offsets: the papers' protocol), what is pruned (``prune``: every field of
:class:`pruning.PruneOptions`, and ``events`` for further events continuing the masks, e.g. SDMPrune's second
stage), the ``output`` (a compacted export with its tokenizer and a manifest holding the recipe, the calibration's
sha256 and the result's record) and an optional ``evaluation`` (the recorded perplexity protocol, lm-eval tasks).

The command line and Python share one code path: ``pruning prune``'s parser (:mod:`pruning.commands.prune`) reads
the file (and any ``--key value`` overrides) into a :class:`Recipe`, whose :meth:`Recipe.run` calls
:func:`pruning.prune` once per event.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .options import PruneOptions

if TYPE_CHECKING:
    from .text import TextReader

__all__ = [
    "Calibration",
    "Evaluation",
    "ModelSource",
    "Output",
    "Recipe",
    "RecipeResult",
    "evaluation_lines",
    "prune_recipe",
    "tokenizer_for",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Dtype = Literal["float32", "bfloat16", "float16"]
# windows are drawn from the first WINDOW_POOL × N × L tokens of an uncapped source (as TextDataModule's windows)
WINDOW_POOL = 8


def tokenizer_for(path: str, model: nn.Module, name: str | None, owner: str = "pruning") -> Any:
    """The tokenizer ``name`` (a hub name or path; ``"bytes"``: none, the UTF-8 byte ids), else the one saved with
    the model at ``path``, else none for a byte-level model (vocabulary 256); ``None`` stands for bytes."""
    from transformers import AutoTokenizer

    if name == "bytes":
        return None
    if name is not None:
        return AutoTokenizer.from_pretrained(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        if getattr(model.config, "vocab_size", None) == 256:
            return None  # byte-level model without tokenizer files
        raise SystemExit(
            f"{owner}: no tokenizer found with {path!r} and the model is not byte-level. "
            "HINT: name one (--tokenizer NAME_OR_PATH, or `tokenizer:` in a recipe)"
        ) from None


@dataclass(frozen=True)
class ModelSource:
    """The model to prune.

    Args:
        path: a local directory (a Hugging Face checkpoint or an export of this project) or a hub name.
        dtype: load the weights in this dtype (statistics are summed in float32 whatever it is).
        device: where the calibration runs (e.g. ``cuda``); the model is loaded on the host and its decoder layers
            visit the device one at a time for activation criteria. Default: the host.
        attn_implementation: e.g. ``sdpa`` or ``eager`` (default: transformers' choice).
        allow_pickle: also load weights stored as pickles (``pytorch_model.bin``), which can run code.
    """

    path: str
    dtype: Dtype = "float32"
    device: str | None = None
    attn_implementation: str | None = None
    allow_pickle: bool = False

    def load(self) -> nn.Module:
        """The model, in eval mode, safetensors only unless ``allow_pickle``."""
        from .loading import from_pretrained

        kwargs: dict[str, Any] = {"dtype": DTYPES[self.dtype]}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        path = Path(self.path).expanduser()
        if (path / "pruning_manifest.json").is_file():  # an export of this project (possibly per-layer widths)
            from .surgery import load_pretrained

            return load_pretrained(path, allow_pickle=self.allow_pickle, **kwargs).eval()
        return from_pretrained(self.path, allow_pickle=self.allow_pickle, key="model.path", **kwargs).eval()


@dataclass(frozen=True)
class Calibration:
    """The calibration data: ``num_samples`` windows of ``seq_len`` tokens at seeded offsets of one text stream.

    Args:
        source: ``stdlib`` (the offline corpus), a local file / directory / glob (or a list of them), or a hub dataset.
        split: the split (stdlib: ``train`` / ``heldout``; a hub dataset's split; local files have one).
        dataset_config: the hub dataset's configuration (e.g. ``en`` for ``allenai/c4``).
        text_field: the column holding the text (json / parquet / hub rows).
        streaming: read a hub dataset as a stream (nothing downloaded beyond what is read).
        tokenizer: a tokenizer name or path, or ``bytes`` (UTF-8 byte ids); default: the model's.
        num_samples: calibration windows (the papers' N).
        seq_len: tokens per window (the papers' L).
        seed: seed of the windows' offsets.
        batch_size: windows per calibration tensor (one forward / backward each).
        max_bytes: read at most this much text (default: enough for 8 × N × L tokens).
    """

    source: str | list[str] = "stdlib"
    split: str = "train"
    dataset_config: str | None = None
    text_field: str = "text"
    streaming: bool = False
    tokenizer: str | None = None
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 1
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for key in ("num_samples", "seq_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"calibration.{key}={getattr(self, key)} must be >= 1. HINT: a positive count")

    def reader(self) -> TextReader:
        """The source's reader (a local source that names no file fails here, before any model is loaded)."""
        from .text import TextReader

        return TextReader(
            self.source,
            self.split,
            dataset_config=self.dataset_config,
            text_field=self.text_field,
            streaming=self.streaming,
            owner="calibration",
            key="source",
        )

    def batches(self, tokenizer: Any, reader: TextReader | None = None) -> list[torch.Tensor]:
        """The windows in tensors of ``batch_size`` (``tokenizer``: an object, or ``None`` for bytes)."""
        from .text import Encoder, batches, packed_stream, windows

        reader = reader or self.reader()
        encoder = Encoder(tokenizer, owner="calibration")
        limit = self.max_bytes if tokenizer is None else None
        if self.max_bytes is None:
            limit = WINDOW_POOL * self.num_samples * self.seq_len
        stream = torch.from_numpy(packed_stream(reader.documents(max_bytes=self.max_bytes), encoder, limit))
        if stream.numel() <= self.seq_len:
            raise ValueError(
                f"calibration.seq_len={self.seq_len} is not below the {stream.numel()} tokens read from "
                f"{reader.describe()}. HINT: lower seq_len, or give more text (source, max_bytes)"
            )
        return list(batches(windows(stream, self.seq_len, self.num_samples, seed=self.seed), self.batch_size))


@dataclass(frozen=True)
class Output:
    """Where the pruned model goes.

    Args:
        path: the export directory (safetensors, the tokenizer, ``pruning_manifest.json``, ``pruning_config.yaml``);
            none: nothing is written.
        compact: remove what structured masks removed (smaller layers; unstructured zeros stay in place).
    """

    path: str | None = None
    compact: bool = True


@dataclass(frozen=True)
class Evaluation:
    """What is measured after pruning (also what ``pruning eval`` measures).

    Args:
        perplexity: the protocol: ``wikitext`` (the papers'), ``stdlib`` (offline held-out files), a local file or
            glob, or a hub dataset; none: no perplexity.
        perplexity_options: fields of :class:`pruning.evaluation.PerplexityProtocol` replacing the preset's
            (``seq_len``, ``stride``, ``max_windows``, ``split``, ``add_bos``, ...).
        tasks: lm-eval tasks (``stdlib_mc`` offline; ``suite`` for the papers' seven).
        limit: at most this many documents per task (a fraction if < 1): smoke runs only.
        num_fewshot: few-shot examples (default: each task's own).
        include_path: extra directories of lm-eval task YAMLs.
        metrics: one row per task with the papers' metric (``paper``), or every metric (``all``).
        batch_size: windows or documents per forward.
    """

    perplexity: str | None = None
    perplexity_options: dict = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    limit: float | None = None
    num_fewshot: int | None = None
    include_path: list[str] | None = None
    metrics: Literal["paper", "all"] = "paper"
    batch_size: int = 8

    def run(self, model: nn.Module, tokenizer: Any, device: str | torch.device | None = None) -> dict[str, Any]:
        """``{"perplexity": ..., "lm_eval": ...}`` of ``model`` where it is (``tokenizer``: ``None`` for bytes)."""
        from .evaluation.harness import DEFAULT_TASKS, evaluate_tasks
        from .evaluation.perplexity import PerplexityProtocol, evaluate_perplexity
        from .text.tokens import byte_tokenizer

        out: dict[str, Any] = {}
        if self.perplexity is not None:
            protocol = PerplexityProtocol.preset(self.perplexity, **self.perplexity_options)
            tok = "bytes" if tokenizer is None else tokenizer
            out["perplexity"] = evaluate_perplexity(model, tok, protocol, self.batch_size, device).as_dict()
        if self.tasks:
            tasks = [t for name in self.tasks for t in (DEFAULT_TASKS if name == "suite" else [name])]
            limit = int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit
            harness = evaluate_tasks(
                model,
                byte_tokenizer() if tokenizer is None else tokenizer,
                tasks,
                limit=limit,
                num_fewshot=self.num_fewshot,
                batch_size=self.batch_size,
                include_path=self.include_path,
                metrics=self.metrics,
            )
            out["lm_eval"] = harness.as_dict()
        return out


def evaluation_lines(out: dict[str, Any]) -> list[str]:
    """What :meth:`Evaluation.run` measured, as the lines the commands print (the protocol with the number)."""
    from .evaluation.harness import markdown_table

    lines = []
    if "perplexity" in out:
        res = out["perplexity"]
        p = res["protocol"]
        lines.append(
            f"perplexity {res['ppl']:.4f}  ({res['tokens']:,} tokens in {res['windows']} windows; source {p['source']}"
            f"{'/' + p['split'] if p['split'] else ''}, seq_len {p['seq_len']}, stride {p['stride']}, "
            f"bos {p['add_bos']}, tokenizer {res['tokenizer']})"
        )
    if "lm_eval" in out:
        lines.append("\n" + markdown_table(out["lm_eval"]["rows"]))
    return lines


@dataclass
class RecipeResult:
    """What :meth:`Recipe.run` did: the pruned model (compacted when the recipe says so), each event's
    :class:`pruning.PruneResult` (the masks as set, before compaction), the calibration's fingerprint, the
    evaluation and the export directory."""

    model: nn.Module
    events: list[Any]
    calibration: dict
    evaluation: dict = field(default_factory=dict)
    export: Path | None = None

    @property
    def masks(self):
        """The masks of the last event (every event continues the previous one's)."""
        return self.events[-1].masks


@dataclass(frozen=True)
class Recipe:
    """A one-shot pruning run: model → calibration → prune (→ further events) → output → evaluation.

    Args:
        model: the model to prune.
        calibration: the calibration windows.
        prune: what is pruned: every field of :class:`pruning.PruneOptions` (method, granularity, sparsity,
            allocation, criterion_options, ...). The first event.
        events: further events on the same calibration, each a dict of ``prune``'s fields it changes (e.g.
            ``{sparsity: 0.3, alpha: 0.42, temperature: 0.5}``: SDMPrune's second stage), the masks continued.
        output: the export.
        evaluation: what is measured after pruning (none: nothing).
        progress: progress bars on stderr.
    """

    model: ModelSource
    calibration: Calibration = field(default_factory=Calibration)
    prune: PruneOptions = field(default_factory=PruneOptions)
    events: list[dict] = field(default_factory=list)
    output: Output = field(default_factory=Output)
    evaluation: Evaluation | None = None
    progress: bool = True

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
        """The recipe in the YAML file at ``path`` (``overrides``: ``--key value`` arguments as on the command
        line), parsed exactly as ``pruning prune --config`` parses it (a bad value raises instead of exiting)."""
        from .commands.prune import from_arguments

        return from_arguments(["--config", str(path), *overrides], exit_on_error=False)

    def options(self) -> list[PruneOptions]:
        """The options of every event: ``prune``, then ``prune`` with each of ``events``' changes."""
        known = {f.name for f in dataclasses.fields(PruneOptions)}
        out = [self.prune]
        for i, changes in enumerate(self.events):
            unknown = sorted(set(changes) - known)
            if unknown:
                raise ValueError(
                    f"events[{i}] has unknown key(s) {unknown}. HINT: an event changes fields of PruneOptions, e.g. "
                    "sparsity, alpha, temperature"
                )
            out.append(dataclasses.replace(self.prune, **changes))
        return out

    def record(self) -> dict:
        """The recipe as plain data (what the manifest holds)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def run(self, log: Callable[[str], None] | None = None) -> RecipeResult:
        """Load the model, read the calibration, prune (each event continuing the previous masks), export and
        evaluate; ``log`` receives a line per stage (the command prints them)."""
        from .pipeline import calibration_fingerprint, prune

        say = log or (lambda _line: None)
        events = self.options()  # a bad event or source fails before the model is loaded
        reader = self.calibration.reader()
        # the whole model is loaded on the host; a model larger than the host's memory would instead be pruned from
        # self.model.path layer by layer straight into self.output.path (the one place to change for that path)
        model = self.model.load()
        tokenizer = tokenizer_for(self.model.path, model, self.calibration.tokenizer, "calibration")
        calib = self.calibration.batches(tokenizer, reader)
        fingerprint = calibration_fingerprint(calib)
        say(f"calibration: {fingerprint['sequences']} windows, {fingerprint['tokens']:,} tokens")
        # a distilling event's teacher is the model with every earlier event's masks lifted: keep the originals
        keep_original = any(o.alpha > 0 for o in events)
        results, masks = [], None
        for i, opts in enumerate(events):
            res = prune(
                model,
                calib,
                options=opts,
                masks=masks,
                keep_original=keep_original,
                device=self.model.device,
                progress=self.progress,
            )
            results.append(res)
            masks = res.masks
            targeted, whole = res.report.targeted.fraction, res.report.model.fraction
            say(
                f"event {i}: {opts.method}, {opts.granularity}, sparsity {opts.sparsity:g} ({opts.sparsity_basis}): "
                f"{targeted:.2%} of the targeted weights pruned, {whole:.2%} of the model"
            )
        result = RecipeResult(model, results, fingerprint)
        if self.output.path is not None:
            result.export = self._export(model, results, tokenizer, fingerprint)
            say(f"wrote {result.export}")
        if self.evaluation is not None:
            result.evaluation = self.evaluation.run(model, tokenizer, self.model.device)
        return result

    def _export(self, model: nn.Module, results: list, tokenizer: Any, fingerprint: dict) -> Path:
        """Compact (structured masks) and save with the tokenizer and the manifest."""
        import yaml

        from .masks import MaskSet
        from .surgery import compact, save_pretrained
        from .text.tokens import byte_tokenizer

        masks = results[-1].masks
        if self.output.compact and masks.groups:
            # compact consumes the masks it is given: the result keeps the masks as they were set
            held = MaskSet()
            held.load_state_dict(masks.state_dict())
            compact(model, held)
        tok = tokenizer if tokenizer is not None else byte_tokenizer()
        manifest = {
            "recipe": self.record(),
            "calibration": fingerprint,
            "events": [r.info for r in results],
        }
        text = yaml.safe_dump(self.record(), sort_keys=False)
        return save_pretrained(model, self.output.path, tokenizer=tok, manifest=manifest, config=text)


def prune_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeResult:
    """Run the recipe in ``path``: ``pruning prune --config PATH`` from Python."""
    return Recipe.load(path, overrides).run()
