"""Prune at scheduled steps and keep the masks applied: a thin adapter over :mod:`pruning.pipeline.event`."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl

from pruning import MaskSet
from pruning.distributed import broadcast_parameters
from pruning.options import GranularityName, SelectionOptions
from pruning.pipeline.event import (
    check_schedule,
    event_collectors,
    event_learner,
    event_options,
    prune_event,
    scores_one_layer_at_a_time,
    with_model_rates,
)
from pruning.schedule import Event, Schedule

from .export import find_hf_model
from .importance import ImportanceCallback


class PruningCallback(pl.Callback):
    """At each event of ``schedule``: scores (from the :class:`ImportanceCallback`'s statistics, or the weights alone)
    → masks (monotone) → applied in place and kept applied through training by :meth:`MaskSet.attach` (any optimiser,
    gradient accumulation, precision, DDP or FSDP2). Sparsity per layer and in total goes to the Lightning logger.

    An event at step ``k`` fires at the end of the micro-batch whose optimiser step makes ``global_step == k``
    (``k = 0``: before the first step). Every rank computes the masks from the same all-reduced statistics, then rank
    0's are broadcast. The event itself is :func:`pruning.pipeline.event.prune_event` (FSDP2: one decoder layer
    unsharded at a time when the selection reads each layer alone).

    The model is the LightningModule's Hugging Face model (``model_attr``, else ``.student``, else ``.model``). If the
    module has the attributes ``masks`` (set to this callback's masks), ``alpha``/``temperature`` (set per event from
    the schedule) and ``weights_frozen``, they are used — :class:`pruning.lightning.DistillationModule` has all.

    Args:
        criterion: ``magnitude | wanda | taylor | gblm | sdm | ...`` (any registered criterion).
        granularity: ``unstructured | 2:4 | 4:8 | mlp_neuron | attention_head | query_head | layer |
            mlp_neuron+attention_head`` (the last: both kinds under one budget, for criteria that support it).
        schedule: when and how much (``one_shot``, ``steps`` or ``cubic``; see :class:`pruning.schedule.Schedule`);
            in Python also its fields as a dict, e.g. ``{"kind": "one_shot", "step": 10, "sparsity": 0.3}``.
        keep_original: stash the original values of pruned weights (the lifted teacher needs them; default: when the
            module's ``teacher_mode`` is ``lifted``). Saved in checkpoints when on.
        model_attr: attribute of the LightningModule holding the Hugging Face model.
        log_layers: also log the sparsity of every decoder layer.
        **options: the rest of :class:`pruning.options.SelectionOptions` (``allocation``, ``scope``,
            ``sparsity_basis``, ``layer_rates`` / ``rates_file``, ``criterion_options``, ...).
    """

    def __init__(
        self,
        criterion: str = "magnitude",
        granularity: GranularityName = "unstructured",
        schedule: Schedule | None = None,
        keep_original: bool | None = None,
        model_attr: str | None = None,
        log_layers: bool = True,
        **options,
    ) -> None:
        self.schedule = Schedule.of(schedule)
        self.options = SelectionOptions(method=criterion, granularity=granularity, **options)
        check_schedule(self.options, self.schedule)  # every event's sparsity, α and τ, before any training step
        self.keep_original = keep_original
        self.model_attr = model_attr
        self.log_layers = log_layers
        self.masks = MaskSet()
        self.done = 0  # events applied so far
        self.history: list[dict] = []
        self.importance: ImportanceCallback | None = None
        self._pending_state: dict | None = None
        self._model = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = self._model = find_hf_model(pl_module, self.model_attr)
        self.options = with_model_rates(self.options, model)
        if self.keep_original is None:
            lifted = getattr(pl_module, "teacher_mode", None) == "lifted"
            self.keep_original = lifted and not self.options.criterion().reconstructs
        if isinstance(getattr(pl_module, "masks", None), MaskSet) and pl_module.masks is not self.masks:
            self.masks = pl_module.masks  # the module's masks (e.g. keep_zeros) are continued, monotonically
        if hasattr(pl_module, "masks"):
            pl_module.masks = self.masks
        events = self.schedule.plan()
        if any(e.alpha is not None or e.temperature is not None for e in events) and not hasattr(pl_module, "alpha"):
            raise ValueError(
                f"the schedule sets alpha/temperature, but {type(pl_module).__name__} has no `alpha` and "
                "`temperature` attributes that its loss reads. HINT: remove them from the schedule"
            )
        first = event_options(self.options, events[0])
        activations, gradients = event_collectors(model, first)
        if activations is None and gradients is None:
            return
        self.importance = ImportanceCallback.of(trainer, self.options.method)
        self.importance.configure(trainer, activations, gradients, events, event_learner(model, first))

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule.check_reachable(trainer.estimated_stepping_batches)  # before the first training step
        self._restore_pending()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelParallelStrategy (FSDP2) restores callback states after on_fit_start (restore_checkpoint_after_setup)
        self._restore_pending()

    def _restore_pending(self) -> None:
        if self._pending_state is not None:  # resumed: masks back on the restored weights, hooks re-attached
            self.masks.load_state_dict(self._pending_state["masks"])
            self.done = int(self._pending_state["done"])
            self.history = list(self._pending_state["history"])
            self._pending_state = None
            if len(self.masks):
                self.masks.attach(self._model)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._fire(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._fire(trainer, pl_module)

    def _fire(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        events = self.schedule.plan()
        while self.done < len(events) and trainer.global_step >= events[self.done].step:
            self._prune(trainer, pl_module, events[self.done])
            self.done += 1

    # ------------------------------------------------------------------ the event
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: Event) -> None:
        model, options = self._model, event_options(self.options, event)
        activations = gradients = None
        learned: dict = {}
        if self.importance is not None:
            self.importance.deactivate(pl_module)
            activations, gradients = self.importance.collected(lazy=scores_one_layer_at_a_time(model, options))
            learned = self.importance.learned()  # e.g. SAAP's σ from the window's batches
            if learned:
                options = dataclasses.replace(options, criterion_options={**options.criterion_options, **learned})
        was_training = model.training
        result = prune_event(model, options, self.masks, activations, gradients, bool(self.keep_original))
        model.train(was_training)
        self.masks.broadcast_()  # rank 0's masks, bit-equal everywhere
        if result.info.get("unsharded_for_scoring") is None and self.options.criterion().reconstructs:
            broadcast_parameters(model, sorted(self.masks.element))  # SparseGPT rewrote the kept weights
        self.masks.attach(model)
        samples = 0
        if self.importance is not None:
            samples = self.importance.samples
            self.importance.reset()
        self._log(trainer, event, result, samples, learned)

    def _log(self, trainer: pl.Trainer, event: Event, result, samples: int, learned: dict) -> None:
        rep = result.report
        self.history.append(
            {
                "step": trainer.global_step,
                "sparsity": event.sparsity,
                "targeted": rep.targeted.fraction,
                "model": rep.model.fraction,
                "micro_batches_scored_on_rank": samples,
                "unsharded_for_scoring": result.info["unsharded_for_scoring"],
                **({"learned": learned} if learned else {}),
            }
        )
        metrics = {"pruning/targeted_sparsity": rep.targeted.fraction, "pruning/model_sparsity": rep.model.fraction}
        if self.log_layers:
            metrics.update({f"pruning/layer_{i}": c.fraction for i, c in sorted(rep.layers.items())})
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def record(self) -> dict:
        """The method, its options, the schedule and what every event did (for the export's manifest)."""
        return {
            "options": self.options.record(),
            "schedule": self.schedule,
            "events": self.schedule.plan(),
            "history": self.history,
            "keep_original": self.keep_original,
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "masks": self.masks.state_dict(with_original=bool(self.keep_original)),
            "done": self.done,
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_state = state_dict
