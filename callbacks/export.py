"""Export the pruned model when fit ends: structured masks compacted into smaller layers, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from transformers import PreTrainedModel

from pruning import MaskSet, compact, save_pretrained
from pruning.distributed import FSDPModule, full_state_dict, is_sharded
from pruning.record import plain


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


def run_record(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
    """What a run did, to make its result again: the module's hyper-parameters, the trainer's settings, the seed, the
    data's record (source, seeds, sha256 of the token ids trained and calibrated on), and what every callback with a
    ``record()`` says (the pruning method, options, schedule and events; the evaluation protocol and results)."""
    strategy = trainer.strategy
    out = {
        "seed": os.environ.get("PL_GLOBAL_SEED"),
        "module": {"class": type(pl_module).__name__, "hyper_parameters": plain(dict(pl_module.hparams))},
        "trainer": {
            "max_steps": trainer.max_steps,
            "max_epochs": trainer.max_epochs,
            "global_step": trainer.global_step,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "strategy": type(strategy).__name__,
            "world_size": trainer.world_size,
        },
        "data": plain(getattr(trainer.datamodule, "record", None)),
        "callbacks": {},
    }
    for callback in trainer.callbacks:
        if callable(getattr(callback, "record", None)):
            out["callbacks"][type(callback).__name__] = plain(callback.record())
    return out


def cli_config(trainer: pl.Trainer) -> str | None:
    """The resolved LightningCLI config of this run (every key, defaults included), if it was started from one."""
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            return callback.parser.dump(callback.config, skip_none=False)
    return None


class ExportOnFitEnd(pl.Callback):
    """At the end of ``fit``, on global rank zero: compact what structured masks removed (``compact=True``) and
    write ``path`` with :func:`pruning.save_pretrained` (safetensors, tokenizer if the module has ``tokenizer``,
    manifest). The trained model is compacted in place: it computes the same logits, with fewer parameters.

    The manifest (``pruning_manifest.json``) holds the run's record (:func:`run_record`: method, options, schedule,
    seed, data hashes, evaluation protocol and results, library versions) and, for a run started by ``pruning
    fit --config``, the resolved config is written beside it as ``pruning_config.yaml``: ``pruning fit --config
    <export>/pruning_config.yaml`` runs it again. Put this callback last, so that the evaluations of ``fit_end`` are
    in the record.

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
        manifest = {**self.manifest, "run": run_record(trainer, pl_module)}
        config = cli_config(trainer)
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
                save_pretrained(plain, self.path, getattr(pl_module, "tokenizer", None), manifest, config)
            trainer.strategy.barrier("export")
            return
        if self.compact and masks is not None and masks.groups:
            compact(model, masks)
        if trainer.is_global_zero:
            save_pretrained(model, self.path, getattr(pl_module, "tokenizer", None), manifest, config)
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
