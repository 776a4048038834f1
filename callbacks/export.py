"""Export the pruned model when fit ends: structured masks compacted into smaller layers, written atomically."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from transformers import PreTrainedModel

from pruning import MaskSet, compact, save_pretrained


def find_hf_model(pl_module: pl.LightningModule, attr: str | None = None) -> PreTrainedModel:
    """The Hugging Face model a LightningModule trains: ``attr`` if given, else ``student`` or ``model``."""
    for name in ([attr] if attr else ["student", "model"]):
        m = getattr(pl_module, name, None)
        if isinstance(m, PreTrainedModel):
            return m
    if isinstance(pl_module, PreTrainedModel):
        return pl_module
    raise AttributeError(
        f"{type(pl_module).__name__} has no Hugging Face model at .{attr or 'student'} or .model. "
        "HINT: set ExportOnFitEnd(model_attr='<attribute holding the PreTrainedModel>')."
    )


def find_masks(trainer: pl.Trainer, pl_module: pl.LightningModule) -> MaskSet | None:
    """The masks in use: a callback's or the module's ``masks`` attribute."""
    for owner in [*trainer.callbacks, pl_module]:
        m = getattr(owner, "masks", None)
        if isinstance(m, MaskSet):
            return m
    return None


class ExportOnFitEnd(pl.Callback):
    """At the end of ``fit``, on global rank zero: compact what structured masks removed (``compact=True``) and
    write ``path`` with :func:`pruning.save_pretrained` (safetensors, tokenizer if the module has ``tokenizer``,
    manifest). The trained model is compacted in place: it computes the same logits, with fewer parameters."""

    def __init__(self, path: str | Path, compact: bool = True, model_attr: str | None = None,
                 manifest: dict | None = None) -> None:
        self.path = Path(path)
        self.compact = compact
        self.model_attr = model_attr
        self.manifest = dict(manifest or {})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        merge = getattr(pl_module, "merge_lora", None)
        if callable(merge):  # LoRA adapters merged (and masks re-applied) before anything is written
            merge()
        model = find_hf_model(pl_module, self.model_attr)
        masks = find_masks(trainer, pl_module)
        if self.compact and masks is not None and masks.groups:
            compact(model, masks)
        if trainer.is_global_zero:
            save_pretrained(model, self.path, getattr(pl_module, "tokenizer", None), self.manifest)
        trainer.strategy.barrier("export")
