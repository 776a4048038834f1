"""Accumulate importance statistics during training steps (a thin adapter over ``pruning.stats``)."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from pruning.distributed import DropGradients, drop_placeholder_optimizer_state, is_sharded
from pruning.importance.base import BatchLearner
from pruning.schedule import Event
from pruning.stats import ActivationCollector, GradientCollector, token_mean_scales


class ImportanceCallback(pl.Callback):
    """Collects, during the training steps that lead up to each pruning event, the statistics the
    :class:`~pruning.callbacks.PruningCallback`'s criterion needs (it tells this callback what to collect and when).

    Which hooks, and what "a sample" is:

    - activations: forward pre-hooks on the targeted Linear modules, every token of every training micro-batch
      (forwards run without autograd — validation, a teacher sharing the weights — are not counted; padding is
      excluded through the batch's ``attention_mask``);
    - gradients, per sequence (the papers' definition: one gradient per sequence), from micro-batches of any size:
      the targeted Linears compute, inside their backward, each sequence's weight gradient from the layer's input
      and output gradient and fold it into the statistics (:class:`~pruning.stats.SequenceGradients`). That is the
      gradient of *one* backward: under gradient accumulation the micro-batch's (``on_after_backward`` would see the
      running sum), under DDP the rank's own, before the all-reduce, so the later cross-rank reduction counts every
      sequence once. The module's loss is taken to be a mean over the micro-batch's next-token positions with label
      ≠ −100 (Hugging Face's causal-LM loss, :class:`~pruning.lightning.DistillationModule`'s): each sequence's
      share is scaled back to the gradient of its own mean loss; positions with ``attention_mask`` 0 add nothing.
      ``on_after_backward`` closes the micro-batch. Parameters that are not a plain Linear's own (embeddings, a tied
      LM head) are read by tensor hooks and need micro-batches of one sequence. ``per_sample='micro_batch'``: tensor
      hooks only, a micro-batch is one sample whatever its size (its loss as the module computes it).
    - batches: a dict (``input_ids``, optional ``labels`` and ``attention_mask``), a tensor of token ids
      ``[sequences, positions]`` (``[positions]``: one sequence), or a tuple / list whose first element is that
      tensor; without ``labels`` the token ids are the labels.
    - with ``precision: 16-mixed`` the hooks see gradients multiplied by the loss scale (and an overflowing step's
      infinities): use bf16 or fp32 for scoring, where gradients are unscaled;
    - statistics are fp32 sums; they are all-reduced over ranks (SUM) once, when the pruning callback uses them,
      then reset for the next event.
    - FSDP2: the per-sequence products (and tensor hooks) read the *unsharded* parameters FSDP all-gathers for each
      forward/backward, so they see the rank's own full per-micro-batch gradient before the reduce-scatter — the
      same per-sequence gradients as without FSDP. Per-weight statistics (Σg², Σ|g|, ... of gblm / taylor) are
      reduce-scattered once per micro-batch onto the rows of the parameter's shard, so each rank holds its rows
      only, and are gathered whole at the event (one layer at a time when the event scores one layer at a time:
      ``collected(lazy=True)``); group and
      activation statistics (one value per group / input feature) are held whole and summed over ranks as under
      DDP.
    - checkpoints: Lightning writes rank 0's callback states only; a checkpoint taken inside a scoring window on
      several ranks holds the statistics summed over ranks (a collective on save). On resume rank 0 keeps whole
      statistics and the counts, the other ranks restart from zero; row-sharded statistics are cut to each rank's
      rows. The resumed event counts every rank's samples once. (The ``samples`` reservoir of mutual_info is
      rank 0's.)

    Args:
        window: collect during the last ``window`` optimiser steps before each event (default: every step since
            the previous event).
        freeze_weights: scoring steps change no weight (default: they train as usual). Set it to score on frozen
            weights (every recipe in ``configs/`` does; the lifted teacher of an event's distillation loss needs
            it): gradients are dropped before the optimiser step (``on_before_optimizer_step``), so no update, no
            weight decay, no momentum change happens, and the targeted weights' own gradients are not even
            computed (zeros: the statistics come from the per-sequence products). Under FSDP2 gradients are dropped
            as soon as backward accumulates them, so FSDP neither reduce-scatters them nor holds sharded gradients
            during scoring.
        per_sample: ``sequence`` (default) or ``micro_batch`` (see above).
    """

    def __init__(
        self,
        window: int | None = None,
        freeze_weights: bool = False,
        per_sample: Literal["sequence", "micro_batch"] = "sequence",
    ) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window={window} must be >= 1 (or null for every step since the previous event)")
        if per_sample not in ("sequence", "micro_batch"):
            raise ValueError(f"per_sample={per_sample!r} must be 'sequence' or 'micro_batch'")
        self.window = window
        self.freeze_weights = freeze_weights
        self.per_sample = per_sample
        self.activations: ActivationCollector | None = None
        self.gradients: GradientCollector | None = None
        self.learner: BatchLearner | None = None
        self.events: list[Event] = []
        self.samples = 0
        self._active = False
        self._saved_loss: tuple | None = None
        self._pending_state: dict | None = None
        self._dropper: DropGradients | None = None

    # ------------------------------------------------------------------ set up by the pruning callback
    @staticmethod
    def of(trainer: pl.Trainer, criterion: str) -> ImportanceCallback:
        """The one ImportanceCallback of ``trainer`` (a criterion that reads statistics of training steps needs it)."""
        found = [c for c in trainer.callbacks if isinstance(c, ImportanceCallback)]
        if len(found) != 1:
            raise ValueError(
                f"criterion={criterion!r} needs statistics from training steps: add exactly one ImportanceCallback "
                f"to trainer.callbacks (found {len(found)}). HINT: in YAML, trainer.callbacks: [{{class_path: "
                "pruning.callbacks.ImportanceCallback}, {class_path: pruning.callbacks.PruningCallback, init_args: "
                "{...}}]"
            )
        return found[0]

    def configure(
        self,
        trainer: pl.Trainer,
        activations: ActivationCollector | None,
        gradients: GradientCollector | None,
        events: list[Event],
        learner: BatchLearner | None = None,
    ) -> None:
        """Collect ``activations`` / ``gradients`` in the windows before ``events`` (the pruning callback's); a
        criterion's ``learner`` (SAAP's σ) closes a batch after every optimiser step of a window."""
        if gradients is not None and str(trainer.precision).startswith("16"):
            raise ValueError(
                f"trainer.precision={trainer.precision!r}: fp16 loss scaling multiplies the gradients the statistics "
                "read by a changing scale (and overflowing steps add infinities). HINT: score with precision "
                "bf16-mixed, bf16-true or 32-true"
            )
        self.activations = activations
        self.gradients = gradients
        self.learner = learner
        if activations is not None:
            activations.grad_enabled_only = True
        self.events = list(events)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    def window_of(self, index: int) -> tuple[int, int]:
        """Optimiser steps ``[start, end)`` whose micro-batches feed event ``index``."""
        end = self.events[index].step
        start = self.events[index - 1].step if index > 0 else 0
        if self.window is not None:
            start = max(start, end - self.window)
        return start, end

    def _event_for(self, step: int) -> Event | None:
        for i, e in enumerate(self.events):
            start, end = self.window_of(i)
            if start <= step < end:
                return e
        return None

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.activations is None and self.gradients is None:
            return
        event = self._event_for(trainer.global_step)
        if event is None:
            self.deactivate(pl_module)
            return
        if not self._active:
            self._activate(pl_module, event)
        ids, labels, mask = batch_tensors(batch)
        if self.gradients is not None:
            scales = token_mean_scales(labels) if self.per_sample == "sequence" else None
            self.gradients.begin_batch(ids.shape[0], mask, scales)
        if self.activations is not None:
            self.activations.token_mask = mask

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss) -> None:
        # FIX: the tensor hooks see the gradient of the loss *as backpropagated*: under automatic optimisation
        # Lightning divides it by accumulate_grad_batches, and fp16 AMP multiplies it by the GradScaler's scale, so
        # with accumulate_grad_batches=2 every per-sample gradient statistic came out halved (Σg², Σ|g|: quartered
        # / halved), not the per-sequence gradients of the core path. Undo both, per backward (PruningCallback
        # refuses fp16 for gradient criteria, for its overflowing steps; the loss-scale division is a safety net).
        if not (self._active and self.gradients is not None):
            return
        scale = float(trainer.accumulate_grad_batches) if pl_module.automatic_optimization else 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale /= float(scaler.get_scale())
        self.gradients.grad_scale = scale

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and self.gradients is not None:
            self.gradients.end_batch()
        if self._active:
            self.samples += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._active and self.learner is not None and self.gradients is not None:
            self.learner.close_batch(self.gradients)  # once per optimiser step: a batch of the window
        if self._active and self.freeze_weights:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # optimisers skip parameters without a gradient: no update, no decay

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for opt in trainer.optimizers:  # restored from a sharded checkpoint saved before any real step
            drop_placeholder_optimizer_state(opt)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.deactivate(pl_module)

    def _activate(self, pl_module: pl.LightningModule, event: Event) -> None:
        if self.activations is not None:
            self.activations.attach()
        if self.gradients is not None:
            self.gradients.weight_grads = not self.freeze_weights  # frozen: the per-sequence products suffice
            self.gradients.attach(batched=self.per_sample == "sequence")
        if event.alpha is not None or event.temperature is not None:
            self._saved_loss = (pl_module.alpha, pl_module.temperature)
            if event.alpha is not None:
                pl_module.alpha = event.alpha
            if event.temperature is not None:
                pl_module.temperature = event.temperature
        if self.freeze_weights and hasattr(pl_module, "weights_frozen"):
            pl_module.weights_frozen = True
        if self.freeze_weights and is_sharded(pl_module):  # FSDP2: no reduce-scatter of gradients nobody uses
            self._dropper = DropGradients(pl_module).attach()
        self._active = True

    def deactivate(self, pl_module: pl.LightningModule) -> None:
        """Stop collecting (hooks off, the module's loss and weights as before the window)."""
        if not self._active:
            return
        if self.activations is not None:
            self.activations.detach()
        if self.gradients is not None:
            self.gradients.detach()
        if self._saved_loss is not None:
            pl_module.alpha, pl_module.temperature = self._saved_loss
            self._saved_loss = None
        if hasattr(pl_module, "weights_frozen"):
            pl_module.weights_frozen = False
        if self._dropper is not None:
            self._dropper.detach()
            self._dropper = None
        self._active = False

    # ------------------------------------------------------------------ used by the pruning callback
    def collected(self, lazy: bool = False) -> tuple[ActivationCollector | None, GradientCollector | None]:
        """The statistics summed over ranks (call on every rank, once per event). ``lazy``: row-sharded gradient
        statistics stay on the rows, gathered whole by whoever reads them (:meth:`GradientCollector.whole`)."""
        if self.activations is not None:
            self.activations.reduce()
        if self.gradients is not None:
            self.gradients.reduce(lazy=lazy)
        if self.learner is not None:
            self.learner.reduce()
        return self.activations, self.gradients

    def learned(self) -> dict:
        """The criterion options learned from the window's batches (after :meth:`collected`; empty without a
        learner)."""
        return self.learner.learned() if self.learner is not None else {}

    def reset(self) -> None:
        for c in (self.activations, self.gradients, self.learner):
            if c is not None:
                c.reset()
        self.samples = 0

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "activations": self.activations.state_dict() if self.activations is not None else None,
            "gradients": self.gradients.state_dict() if self.gradients is not None else None,
            "learner": self.learner.state_dict() if self.learner is not None else None,
            "samples": self.samples,
        }

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # FIX: only rank 0's callback states reach the checkpoint file (DDP and FSDP alike), so a checkpoint taken
        # mid-window lost the other ranks' partial statistics and, on resume, every rank restarted from rank 0's:
        # rank 0's samples were then counted once per rank. The sums (and counts) are summed over ranks here (a
        # collective: every rank saves), flagged, and on load only rank 0 keeps them.
        for opt in trainer.optimizers:  # after a sharded save (see drop_placeholder_optimizer_state)
            drop_placeholder_optimizer_state(opt)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return
        state = dict(state)
        for kind, c in (("activations", self.activations), ("gradients", self.gradients), ("learner", self.learner)):
            if c is not None:
                state[kind] = c.merged_state_dict()
        state["reduced_over_ranks"] = True
        checkpoint["callbacks"][self.state_key] = state

    def load_state_dict(self, state_dict: dict) -> None:
        if self.activations is None and self.gradients is None:
            self._pending_state = state_dict  # restored before configure(): applied there
        else:
            self._load(state_dict)

    def _load(self, state: dict) -> None:
        merged = state.get("reduced_over_ranks") and dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if merged else 0
        for kind, c in (("activations", self.activations), ("gradients", self.gradients), ("learner", self.learner)):
            if state.get(kind) is None or c is None:
                continue
            if merged:  # every rank's sums (see on_save_checkpoint): rank 0 keeps them, row-sharded ones per rank
                c.load_merged_state_dict(state[kind], rank)
            else:
                c.load_state_dict(state[kind])
        self.samples = int(state.get("samples", 0))


def batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(token ids [sequences, positions], labels, attention mask or None)`` of a training batch: a dict
    (``input_ids``, optional ``labels``, ``attention_mask``), a tensor of token ids, or a tuple / list whose first
    element is one (a ``[positions]`` tensor is one sequence); the token ids are the labels unless given."""
    if isinstance(batch, dict):
        ids, labels, mask = batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
    else:
        ids, labels, mask = (batch[0] if isinstance(batch, (tuple, list)) else batch), None, None
    if not torch.is_tensor(ids):
        raise TypeError(
            f"a training batch of {type(batch).__name__} holds no tensor of token ids where expected. HINT: yield "
            "dicts with input_ids, tensors of token ids, or tuples whose first element is one"
        )
    ids = ids if ids.dim() >= 2 else ids.unsqueeze(0)
    labels = ids if labels is None else labels.reshape(ids.shape[0], -1)
    return ids, labels, mask
