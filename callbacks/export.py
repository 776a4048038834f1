"""Export the pruned model when fit ends: structured masks compacted into smaller layers, written atomically."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from transformers import PreTrainedModel

from pruning import MaskSet, compact, save_pretrained
from pruning.distributed import FSDPModule, full_state_dict, is_sharded


def find_hf_model(pl_module: pl.LightningModule, attr: str | None = None) -> PreTrainedModel:
    """The Hugging Face model a LightningModule trains: ``attr`` if given, else ``student`` or ``model``."""
    for name in [attr] if attr else ["student", "model"]:
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
    manifest). The trained model is compacted in place: it computes the same logits, with fewer parameters.

    FSDP2 (a sharded model): the full state is gathered to rank 0's host (``get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``, a collective on every rank), loaded into an unsharded copy of the
    model built there without initialisation (meta device, then the gathered tensors assigned), which is compacted
    and written: the same files a single-process run with the same weights and masks writes. The sharded model
    itself is left as it is (not compacted). Peak on rank 0: one full model in host memory."""

    def __init__(
        self, path: str | Path, compact: bool = True, model_attr: str | None = None, manifest: dict | None = None
    ) -> None:
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
        if is_sharded(model):
            state = full_state_dict(model)  # collective: every rank takes part, rank 0 receives
            # the masks whole (element masks held as rows are gathered: collective, so on every rank)
            whole = masks.state_dict() if self.compact and masks is not None and masks.groups else None
            if trainer.is_global_zero:
                plain = unsharded_copy(model, state)
                del state
                if whole is not None:
                    detached = MaskSet()  # compact consumes its masks: the sharded model keeps using these
                    detached.load_state_dict(whole)
                    compact(plain, detached)
                save_pretrained(plain, self.path, getattr(pl_module, "tokenizer", None), self.manifest)
            trainer.strategy.barrier("export")
            return
        if self.compact and masks is not None and masks.groups:
            compact(model, masks)
        if trainer.is_global_zero:
            save_pretrained(model, self.path, getattr(pl_module, "tokenizer", None), self.manifest)
        trainer.strategy.barrier("export")


def unsharded_copy(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A plain (unsharded, host) instance of a ``fully_shard``-ed Hugging Face model holding ``state`` (its full state
    dict): built on the meta device (no initialisation, no memory), the tensors of ``state`` assigned, buffers
    (not in the state dict when non-persistent, e.g. rotary frequencies) copied from ``model``."""
    cls = next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise KeyError(f"the gathered state has keys the model does not: {unexpected[:5]}")
    for name, buf in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        plain.get_submodule(owner)._buffers[attr] = buf.detach().to("cpu", copy=True)
    if getattr(model.config, "tie_word_embeddings", False):
        plain.tie_weights()
    still = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if still:
        raise RuntimeError(f"no gathered value for {still[:5]} (missing from the state: {missing[:5]})")
    plain.generation_config = model.generation_config
    return plain.eval()
