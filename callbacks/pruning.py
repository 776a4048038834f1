"""Prune at scheduled steps and keep the masks applied (a thin adapter over ``pruning.prune`` and ``MaskSet``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn

from pruning import MaskSet, ModelStructure, get_criterion, prune
from pruning import allocation as alloc
from pruning.distributed import fsdp_modules, is_sharded, local, local_part, unsharded, unsharded_module
from pruning.pipeline.oneshot import STRUCTURED, _check_args, _parse_nm, scores_layer_by_layer
from pruning.schedule import Schedule
from pruning.stats import ActivationCollector, GradientCollector

from .export import find_hf_model
from .importance import ImportanceCallback


@contextmanager
def _base_layers(model: nn.Module) -> Iterator[None]:
    """PEFT's LoRA wrappers swapped back for the ``nn.Linear`` they wrap (``.base_layer``), restored on exit.

    FIX (LoRA): ``ModelStructure`` accepts only ``nn.Linear`` projections, and PEFT replaces every targeted one by
    a wrapper module, so any event on a module built with ``lora=...`` failed with ``UnsupportedModelError:
    '<layer>.self_attn.q_proj' is Linear, expected nn.Linear``. Structure discovery and scoring run on the base
    layers instead: the same Parameter objects under their original names, so masks, statistics and hooks on
    them (activation pre-hooks fire when the wrapper calls its base layer) keep working once the wrappers are
    back."""
    swapped = []
    for name, mod in list(model.named_modules()):
        base = getattr(mod, "base_layer", None)
        if name and isinstance(base, nn.Module) and hasattr(mod, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped.append((parent, child, mod))
    try:
        for parent, child, mod in swapped:
            setattr(parent, child, mod.base_layer)
        yield
    finally:
        for parent, child, mod in swapped:
            setattr(parent, child, mod)


class PruningCallback(pl.Callback):
    """At each event of ``schedule``: scores (from the :class:`ImportanceCallback`'s statistics, or weights alone)
    → masks (monotone) → applied in place, kept applied through training by :meth:`MaskSet.attach` (gradients
    masked, pruned weights and optimiser state re-zeroed after every optimiser step: any optimiser, gradient
    accumulation, precision or DDP). Sparsity per layer and in total is logged through the Lightning logger.

    An event at step ``k`` fires at the end of the micro-batch whose optimiser step makes ``global_step == k``
    (``k = 0``: before the first step). Every rank computes the masks from the same all-reduced statistics; rank
    0's masks are then broadcast so that they are bit-identical everywhere.

    FSDP2 (``ModelParallelStrategy`` with the module's ``configure_model`` sharding it): statistics are collected
    from each rank's unsharded per-micro-batch gradients (see :class:`ImportanceCallback`); at an event every FSDP
    module is unsharded (all-gathered) for the scoring, so the scores, the selection and the masks are the same
    computation on the same numbers as a single process; the masks are then applied to each rank's rows and kept
    there through training. When the allocation reads each layer on its own (``uniform`` or ``rates``, not ``layer``
    granularity, a global unstructured scope or SparseGPT's rewriting) one decoder layer is unsharded at a time
    (then the root, for embeddings / LM head), so the event holds the shards plus one layer's full weights and its
    per-weight gradient statistics gathered whole; otherwise every FSDP module is unsharded at once, one full model
    per rank, and every statistic gathered whole. Between events only the shards are held.

    The model is the LightningModule's Hugging Face model (``model_attr``, else ``.student``, else ``.model``),
    whose forward returns HF-style outputs (``.logits``); the module's ``training_step`` computes the loss. If the
    module has the attributes ``masks`` (set to this callback's masks), ``alpha``/``temperature`` (set per event
    from the schedule) and ``weights_frozen``, they are used — :class:`pruning.lightning.DistillationModule` has all.

    Args:
        criterion: ``magnitude | wanda | taylor | gblm | sdm`` (any registered criterion).
        granularity: ``unstructured | 2:4 | 4:8 | mlp_neuron | attention_head | query_head | layer``.
        schedule: when and how much (``one_shot``, ``steps`` or ``cubic``; see :class:`pruning.schedule.Schedule`).
        allocation: ``uniform | global | owl | rates`` across layers.
        scope: unstructured comparison group ``row | layer | global`` (default ``row``).
        sparsity_basis: ``targets`` (fraction of the targeted weights) or ``model`` (of all parameters).
        layer_rates: per-layer sparsities for ``allocation: rates``.
        rates_file: instead of ``layer_rates``: the JSON written by ``pruning search`` (Self-Pruner) or ``pruning
            rank`` (SAAP), read when the fit starts; SAAP's learned ``criterion_options`` (σ) come with it when
            ``criterion`` is ``saap`` (options given here win).
        min_keep: lower bound of the kept fraction per layer (``global``).
        max_keep: upper bound of the kept fraction per layer (``global``).
        owl_m: OWL outlier threshold M.
        owl_lambda: OWL rate spread λ.
        criterion_options: the criterion's own knobs (e.g. ``{alpha: 100}`` for gblm).
        include_embeddings: unstructured: also target the input embeddings.
        include_lm_head: unstructured: also target the LM head.
        keep_original: stash the original values of pruned weights (the lifted teacher needs them; default: when
            the module's ``teacher_mode`` is ``lifted``). Saved in checkpoints when on.
        model_attr: attribute of the LightningModule holding the Hugging Face model.
        log_layers: also log the sparsity of every decoder layer.
    """

    def __init__(
        self,
        criterion: str = "magnitude",
        granularity: Literal[
            "unstructured", "2:4", "4:8", "mlp_neuron", "attention_head", "query_head", "layer"
        ] = "unstructured",
        schedule: Schedule | None = None,
        allocation: Literal["uniform", "global", "owl", "rates"] = "uniform",
        scope: Literal["row", "layer", "global"] | None = None,
        sparsity_basis: Literal["targets", "model"] = "targets",
        layer_rates: list[float] | None = None,
        rates_file: str | None = None,
        min_keep: float = 0.0,
        max_keep: float = 1.0,
        owl_m: float = 5.0,
        owl_lambda: float = 0.08,
        criterion_options: dict | None = None,
        include_embeddings: bool = False,
        include_lm_head: bool = False,
        keep_original: bool | None = None,
        model_attr: str | None = None,
        log_layers: bool = True,
    ) -> None:
        self.schedule = schedule if schedule is not None else Schedule()
        self.criterion_name = criterion
        self.criterion_options = dict(criterion_options or {})
        self.criterion = get_criterion(criterion, **self.criterion_options)
        self.criterion.check_granularity(granularity)
        nm = _parse_nm(granularity)
        if rates_file is not None:
            if layer_rates is not None:
                raise ValueError("give layer_rates or rates_file, not both")
            if allocation != "rates":
                raise ValueError(f"rates_file is given but allocation={allocation!r}. HINT: set allocation: rates")
        self.rates_file = rates_file
        for e in self.schedule.plan():
            _check_args(
                e.sparsity if nm is None else 1 - nm[0] / nm[1],
                granularity,
                allocation,
                scope,
                sparsity_basis,
                layer_rates if rates_file is None else [],
                nm,
            )
        if nm is not None and any(abs(e.sparsity - (1 - nm[0] / nm[1])) > 1e-9 for e in self.schedule.plan()):
            raise ValueError(
                f"granularity={granularity!r} prunes exactly {1 - nm[0] / nm[1]:g}: set schedule "
                f"sparsity to {1 - nm[0] / nm[1]:g}"
            )
        needs_stats = self.criterion.needs_activations or self.criterion.needs_gradients
        if needs_stats and self.schedule.plan()[0].step < 1:
            raise ValueError(
                f"criterion={criterion!r} scores from statistics collected on training steps before the event, but "
                f"the first event is at step {self.schedule.plan()[0].step}. HINT: schedule the first event at a "
                "step >= 1 (e.g. schedule: {kind: one_shot, step: 32, sparsity: 0.3})."
            )
        self.granularity = granularity
        self.options = dict(
            allocation=allocation,
            scope=scope,
            sparsity_basis=sparsity_basis,
            layer_rates=layer_rates,
            min_keep=min_keep,
            max_keep=max_keep,
            owl_m=owl_m,
            owl_lambda=owl_lambda,
            include_embeddings=include_embeddings,
            include_lm_head=include_lm_head,
        )
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
        if self.rates_file is not None and self.options["layer_rates"] is None:
            with _base_layers(model):
                n_layers = ModelStructure(model).num_layers
            rates, options = alloc.load_rates_file(self.rates_file, self.criterion_name, self.granularity, n_layers)
            self.options["layer_rates"] = rates
            if options:
                self.criterion_options = {**options, **self.criterion_options}
                self.criterion = get_criterion(self.criterion_name, **self.criterion_options)
        if self.keep_original is None:
            self.keep_original = (
                getattr(pl_module, "teacher_mode", None) == "lifted" and not self.criterion.reconstructs
            )
        if isinstance(getattr(pl_module, "masks", None), MaskSet) and pl_module.masks is not self.masks:
            self.masks = pl_module.masks  # the module's masks (e.g. keep_zeros) are continued, monotonically
        if hasattr(pl_module, "masks"):
            pl_module.masks = self.masks
        events = self.schedule.plan()
        if any(e.alpha is not None or e.temperature is not None for e in events) and not hasattr(pl_module, "alpha"):
            raise ValueError(
                f"the schedule sets alpha/temperature, but {type(pl_module).__name__} has no `alpha` "
                "and `temperature` attributes that its loss reads. HINT: remove them from the schedule"
            )
        crit = self.criterion
        if not (crit.needs_activations or crit.needs_gradients):
            return
        imps = [c for c in trainer.callbacks if isinstance(c, ImportanceCallback)]
        if len(imps) != 1:
            raise ValueError(
                f"criterion={self.criterion_name!r} needs statistics from training steps: add exactly one "
                f"ImportanceCallback to trainer.callbacks (found {len(imps)}). HINT: in YAML, "
                "trainer.callbacks: [{class_path: pruning.callbacks.ImportanceCallback}, "
                "{class_path: pruning.callbacks.PruningCallback"
                ", init_args: {...}}]"
            )
        self.importance = imps[0]
        with _base_layers(model):
            self._configure_statistics(trainer, model, events)

    def _configure_statistics(self, trainer: pl.Trainer, model, events) -> None:
        crit = self.criterion
        structure = ModelStructure(model)
        act = grads = None
        if self.granularity in STRUCTURED:
            group_sets = [gs for k in [self.granularity] for gs in structure.group_sets(k)]  # type: ignore[arg-type]
            params = sorted({m.name for gs in group_sets for m in gs.members})
            modules = {m.name.rsplit(".", 1)[0] for gs in group_sets for m in gs.members}
            act_modules = {n: model.get_submodule(n) for n in sorted(modules)}
        else:
            group_sets = []
            act_modules = structure.targets(self.options["include_embeddings"], self.options["include_lm_head"])
            params = [n + ".weight" for n in act_modules]
        if crit.needs_activations:
            act = ActivationCollector(act_modules, **crit.collector_options())  # e.g. Gram matrices for sparsegpt
        if crit.needs_gradients:
            try:
                grads = GradientCollector(
                    model,
                    param_names=params if crit.grad_kinds else (),
                    grad_kinds=crit.grad_kinds or ("sum",),
                    group_sets=group_sets if crit.group_kinds else (),
                    group_kinds=crit.group_kinds or ("coupled",),
                )
            except KeyError as e:
                raise ValueError(
                    f"criterion={self.criterion_name!r} needs gradients of {e}, which this model "
                    "does not expose (LoRA-wrapped?). HINT: score in a run without lora"
                ) from e
            frozen = [n for n, p in grads.params.items() if not p.requires_grad]
            frozen += [n for n, p in grads._group_params.items() if not p.requires_grad]
            if frozen:
                raise ValueError(
                    f"criterion={self.criterion_name!r} needs gradients of {frozen[:3]}, which are frozen (LoRA "
                    "freezes the base weights). HINT: score and prune in a run without lora, export, then recover "
                    "with lora from the export"
                )
        if grads is not None and str(trainer.precision).startswith("16"):
            raise ValueError(
                f"trainer.precision={trainer.precision!r}: fp16 loss scaling multiplies the gradients the statistics "
                "read by a changing scale (and overflowing steps add infinities). HINT: score with precision "
                "bf16-mixed, bf16-true or 32-true"
            )
        self.importance.configure(act, grads, events)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._fire(trainer, pl_module)

    def _fire(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        events = self.schedule.plan()
        while self.done < len(events) and trainer.global_step >= events[self.done].step:
            self._prune(trainer, pl_module, events[self.done])
            self.done += 1

    # ------------------------------------------------------------------ the event
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event) -> None:
        model = self._model
        sharded = is_sharded(model)
        layers = self._layer_modules(model) if sharded else None
        act = grads = None
        if self.importance is not None:
            self.importance._deactivate(pl_module)
            # one layer scored at a time: row-sharded gradient statistics are gathered whole layer by layer too
            act, grads = self.importance.collected(lazy=layers is not None)
        opts = dict(self.options)
        was_training = model.training
        rewritten: dict[str, torch.Tensor] = {}
        kw = dict(
            criterion_options=self.criterion_options,
            gradients=grads,
            activations=act,
            masks=self.masks,
            keep_original=bool(self.keep_original),
            sequential=False,
            progress=False,
            **opts,
        )
        if layers is not None:
            # FSDP2, each layer scored on its own: one decoder layer (then the root's own weights) unsharded at a
            # time, not the whole model, with its row-sharded statistics gathered whole inside the same scope; prune
            # applies the masks to the shards after the last layer
            def layer_scope(i):
                return unsharded_module(model if i is None else layers[i])

            with _base_layers(model):
                result = prune(
                    model, None, self.criterion_name, event.sparsity, self.granularity, layer_scope=layer_scope, **kw
                )
        else:
            # the full weights for the scoring (FSDP2: writes into them are dropped at reshard: masks and rewritten
            # weights are put into the shards below); LoRA wrappers out of the way while scoring (see _base_layers)
            with unsharded(model), _base_layers(model):
                result = prune(model, None, self.criterion_name, event.sparsity, self.granularity, **kw)
                if sharded and self.criterion.reconstructs:  # SparseGPT rewrote kept weights of the full copies
                    params = dict(model.named_parameters())
                    rewritten = {k: params[k].detach().clone() for k in sorted(self.masks.element)}
        model.train(was_training)
        if rewritten:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, full in rewritten.items():
                    local(params[k]).copy_(local_part(full, params[k]))
        self._broadcast_masks(model)
        self.masks.attach(model)
        samples = 0
        if self.importance is not None:
            samples = self.importance.samples
            self.importance.reset()
        rep = result.report
        record = {
            "step": trainer.global_step,
            "sparsity": event.sparsity,
            "targeted": rep.targeted.fraction,
            "model": rep.model.fraction,
            "micro_batches_scored_on_rank": samples,
            "unsharded_for_scoring": None if not sharded else "layer" if layers is not None else "model",
        }
        self.history.append(record)
        metrics = {"pruning/targeted_sparsity": rep.targeted.fraction, "pruning/model_sparsity": rep.model.fraction}
        if self.log_layers:
            metrics.update({f"pruning/layer_{i}": c.fraction for i, c in sorted(rep.layers.items())})
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def _layer_modules(self, model) -> list[nn.Module] | None:
        """The decoder layers, when this event can score them one at a time on a sharded model (each layer and the
        root an FSDP module; an allocation that reads each layer on its own, see ``scores_layer_by_layer``)."""
        o = self.options
        if not scores_layer_by_layer(
            self.criterion_name, self.granularity, o["allocation"], o["scope"], self.criterion_options
        ):
            return None
        with _base_layers(model):
            layers = list(ModelStructure(model).layers)
        # exactly the root and every decoder layer (another FSDP module, e.g. a separately wrapped LM head or a
        # sub-module of a layer, would stay sharded inside a layer's scope): else the whole model is unsharded
        if {id(m) for m in fsdp_modules(model)} != {id(model)} | {id(m) for m in layers}:
            return None
        return layers

    def _broadcast_masks(self, model) -> None:
        """Rank 0's masks everywhere (they are computed from identical statistics; this makes them bit-equal)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        changed = False
        for store in (self.masks.element, self.masks.groups):
            # element masks held as rows were made bit-equal at the event that built them (and are not whole here)
            for k in sorted(k for k in store if store is not self.masks.element or k not in self.masks._rows):
                t = store[k].to(device=device, dtype=torch.uint8)
                dist.broadcast(t, src=0)
                new = t.to(store[k].device, torch.bool)
                changed |= not torch.equal(new, store[k])
                store[k] = new
        if changed:
            self.masks.apply(model)
        if self.criterion.reconstructs and not is_sharded(model):
            # SparseGPT rewrote the kept weights: rank 0's values everywhere too (sharded: each row has one owner)
            params = dict(model.named_parameters())
            for k in sorted(self.masks.element):
                p = params[k]
                t = p.data.to(device)
                dist.broadcast(t, src=0)
                p.data.copy_(t)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "masks": self.masks.state_dict(with_original=bool(self.keep_original)),
            "done": self.done,
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_state = state_dict
