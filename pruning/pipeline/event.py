"""A pruning event during training: the statistics were collected over training steps, and the model may be
sharded (FSDP2) or wrapped by PEFT's LoRA. What the Lightning callbacks call at each event; a plain PyTorch loop can
call it the same way: collect with the collectors of :func:`event_collectors`, reduce them over the ranks
(``gradients.reduce(lazy=scores_one_layer_at_a_time(model, options))``), then :func:`prune_event`."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..allocation import load_rates_file
from ..distributed import fsdp_modules, is_sharded, local, local_part, unsharded, unsharded_module
from ..importance.base import BatchLearner
from ..lora import base_layers
from ..masks import MaskSet
from ..options import PruneOptions, SelectionOptions
from ..schedule import Event, Schedule
from ..stats import ActivationCollector, GradientCollector
from ..structure import ModelStructure
from .drive import prune_from_statistics
from .pruner import Pruner, PruneResult


def event_options(selection: SelectionOptions, event: Event) -> PruneOptions:
    """The options of one scheduled event: ``selection`` at the event's sparsity, with its scoring loss (α, τ) for a
    criterion that distills (for the others the loss is the training module's, whatever it is)."""
    loss = {k: v for k, v in (("alpha", event.alpha), ("temperature", event.temperature)) if v is not None}
    return PruneOptions.of(selection, sparsity=event.sparsity, **(loss if selection.criterion().distills else {}))


def check_schedule(selection: SelectionOptions, schedule: Schedule) -> None:
    """Every event's options are valid (sparsity, α, τ), and a criterion that reads statistics of training steps has
    steps before its first event."""
    events = schedule.plan()
    for e in events:
        event_options(selection, e)
    crit = selection.criterion()
    if (crit.needs_activations or crit.needs_gradients) and events[0].step < 1:
        raise ValueError(
            f"criterion={selection.method!r} scores from statistics collected on training steps before the event, "
            f"but the first event is at step {events[0].step}. HINT: schedule the first event at a step >= 1 (e.g. "
            "schedule: {kind: one_shot, step: 32, sparsity: 0.3})."
        )


def with_model_rates(selection: SelectionOptions, model: nn.Module) -> SelectionOptions:
    """``selection`` with its ``rates_file`` read for ``model`` (checked against its layers; SAAP's learned σ
    under the options given)."""
    if selection.rates_file is None:
        return selection
    with base_layers(model):
        layers = ModelStructure(model).num_layers
    rates, learned = load_rates_file(selection.rates_file, selection.method, str(selection.unit), layers)
    return selection.with_rates(rates, learned)


def event_collectors(
    model: nn.Module, options: PruneOptions
) -> tuple[ActivationCollector | None, GradientCollector | None]:
    """The collectors of the statistics ``options``' criterion reads, for the targeted weights of ``model`` (LoRA
    wrappers seen through). Refuses gradients of frozen parameters (LoRA freezes the base weights)."""
    with base_layers(model):
        pruner = Pruner(model, options)
        activations, gradients = pruner.activation_collector(), pruner.gradient_collector()
    if gradients is not None:
        frozen = [n for n, p in gradients.parameters.items() if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"criterion={options.method!r} needs gradients of {frozen[:3]}, which are frozen (LoRA freezes the "
                "base weights). HINT: score and prune in a run without lora, export, then recover with lora from the "
                "export"
            )
    return activations, gradients


def event_learner(model: nn.Module, options: PruneOptions) -> BatchLearner | None:
    """What ``options``' criterion learns batch by batch from the scoring window (SAAP's σ with ``learn_sigma``),
    for the targeted groups of ``model``; ``None`` for most criteria."""
    with base_layers(model):
        pruner = Pruner(model, options)
        return pruner.criterion.batch_learner(pruner.targets.group_sets)


def scores_one_layer_at_a_time(model: nn.Module, options: PruneOptions) -> bool:
    """Whether an event on this (sharded) model unshards one decoder layer at a time; its row-sharded gradient
    statistics may then stay on the rows until that layer is scored (``GradientCollector.reduce(lazy=True)``)."""
    with base_layers(model):
        return _layer_scopes(model, options) is not None


def _layer_scopes(model: nn.Module, options: PruneOptions) -> list[nn.Module] | None:
    """The decoder layers, when a sharded model's event can score them one at a time: the options read each layer
    alone, and the FSDP modules are exactly the root and every decoder layer (another FSDP module, e.g. a separately
    wrapped LM head, would stay sharded inside a layer's scope)."""
    if not (is_sharded(model) and options.scores_layers_alone):
        return None
    layers = list(Pruner(model, options).structure.layers)
    if {id(m) for m in fsdp_modules(model)} != {id(model)} | {id(m) for m in layers}:
        return None
    return layers


def prune_event(
    model: nn.Module,
    options: PruneOptions,
    masks: MaskSet,
    activations: ActivationCollector | None = None,
    gradients: GradientCollector | None = None,
    keep_original: bool = False,
) -> PruneResult:
    """Score, select and apply the masks (monotone, continuing ``masks``) from statistics collected and reduced
    over the ranks (lazily when :func:`scores_one_layer_at_a_time`).

    FSDP2: when the options read each layer alone, one decoder layer (then the root, for embeddings / LM head) is
    unsharded at a time, with its row-sharded gradient statistics gathered whole inside the same scope; otherwise
    every FSDP module is unsharded for the scoring (writes into the unsharded parameters are dropped at reshard, so
    masks are applied to the shards afterwards and weights rewritten by SparseGPT are copied into them).
    ``result.info["unsharded_for_scoring"]`` says which (``None`` unsharded model)."""
    sharded = is_sharded(model)
    with base_layers(model):
        layers = _layer_scopes(model, options)
    act = activations.stats if activations is not None else None
    rewritten: dict[str, torch.Tensor] = {}
    with base_layers(model):
        pruner = Pruner(model, options, masks, keep_original)
        if layers is not None:
            scope = lambda i: unsharded_module(model if i is None else layers[i])  # noqa: E731
            prune_from_statistics(pruner, act, gradients, layer_scope=scope)
        else:
            with unsharded(model) if sharded else nullcontext():
                prune_from_statistics(pruner, act, gradients)
                if sharded and pruner.criterion.reconstructs:  # SparseGPT rewrote kept weights of the full copies
                    params = dict(model.named_parameters())
                    rewritten = {k: params[k].detach().clone() for k in sorted(masks.element)}
    if rewritten:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, full in rewritten.items():
                local(params[k]).copy_(local_part(full, params[k]))
    result = pruner.result()
    result.info["unsharded_for_scoring"] = None if not sharded else "layer" if layers is not None else "model"
    return result
