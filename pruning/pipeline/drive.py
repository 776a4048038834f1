"""How a :class:`~pruning.pipeline.pruner.Pruner`'s stages are driven over a model.

- :func:`prune_from_statistics`: the statistics of the whole model are there already (collected over training steps
  by the callbacks, or by one calibration pass over the dense model); score, select and apply, one decoder layer at a
  time unless the selection compares layers.
- :func:`prune_layer_by_layer`: activation criteria, the papers' protocol (Wanda, SparseGPT, GBLM): each layer's
  statistics are taken on the inputs the already-pruned layers before it produce (``one_pass``: each Linear pruned
  in its forward pre-hook on the inputs the already-pruned Linears before it produce, SparseGPT's "true
  sequential").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from ..stats import ActivationCollector, ActivationStats, GradientCollector
from .layerwise import run_layerwise
from .pruner import Pruner

LayerScope = Callable[[int | None], AbstractContextManager]
Batches = Sequence[torch.Tensor]
Grads = GradientCollector | None
Device = torch.device | str | None


def prune_from_statistics(
    pruner: Pruner,
    activations: dict[str, ActivationStats] | None = None,
    gradients: GradientCollector | None = None,
    layer_scope: LayerScope | None = None,
) -> None:
    """Score, select and apply from statistics already reduced over the whole model.

    ``layer_scope(i)``: a context entered around the scoring of decoder layer ``i`` (``None``: the targeted weights
    outside the layers); the weights are read inside it (FSDP2: it unshards that one module, so an event holds one
    layer's full weights at a time). Gradient statistics reduced with ``lazy=True`` (row-sharded) are gathered whole
    inside each scope, for that scope's weights only. Only for selections that read each layer alone
    (:attr:`~pruning.options.SelectionOptions.scores_layers_alone`). The masks are applied after the last scope.
    """
    options = pruner.options
    if layer_scope is not None and not options.scores_layers_alone:
        raise ValueError(
            f"layer_scope scores one decoder layer at a time; method={options.method!r}, granularity="
            f"{str(options.unit)!r}, allocation={options.allocation!r}, scope={options.comparison_scope!r} needs "
            "every layer's weights at once. HINT: pass layer_scope only when options.scores_layers_alone"
        )
    ctx = pruner.context(activations, gradients)
    if layer_scope is None and gradients is not None:  # everything whole at once
        gradients.gather(pruner.targets.weights)
    if options.allocation == "owl":
        pruner.set_outlier_rates([pruner.outlier_ratio(i, ctx) for i in range(pruner.structure.num_layers)])
    if not pruner.selects_layer_by_layer:
        pruner.select_across_layers(ctx)
        pruner.apply()
        return
    scope = layer_scope or (lambda i: nullcontext())
    layers: list[int | None] = [*range(pruner.structure.num_layers), None]
    for layer in layers:
        names = pruner.targets.weights_in(layer)
        if layer is None and not names:
            continue
        whole = gradients.whole(names) if gradients is not None else nullcontext()
        with scope(layer), whole:
            pruner.refresh_weights(layer)  # the parameters registered inside the scope
            pruner.select_layer(layer, ctx)
    pruner.refresh_weights()
    pruner.apply()


def collect_activations(
    pruner: Pruner, calibration: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> dict[str, ActivationStats] | None:
    """The criterion's activation statistics of every targeted module from one no-grad pass of the calibration data
    through the model as it is (``None`` when the criterion reads none)."""
    collector = pruner.activation_collector()
    if collector is None:
        return None
    model = pruner.model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    collector.attach()
    try:
        with torch.no_grad():
            for ids in calibration:
                model(input_ids=ids.to(dev), use_cache=False)
    finally:
        collector.detach()
        model.train(was)
    collector.reduce()
    return collector.stats


def layer_statistics(pruner: Pruner, layer: int, forward_all: Callable, plain: bool = False) -> dict:
    """One decoder layer's input statistics over the calibration data reaching it (``plain``: Σx² only, what OWL's
    ratios read). The pass ends at the MLP's output projection's input: its output is recomputed after pruning."""
    modules = pruner.targets.modules_in(layer)
    collector = ActivationCollector(modules) if plain else pruner.activation_collector(modules)
    collector.attach()
    structure = pruner.structure
    # a layer of experts only (no dense MLP) runs whole, and so does one whose experts are scored (Qwen2-MoE runs
    # its shared expert, the dense MLP, before the router)
    experts = any(gs.kind.startswith("expert") for gs in pruner.targets.sets_in(layer))
    stop = structure.linear(layer, structure.family.mlp_out) if structure.family.has_mlp and not experts else None
    forward_all(stop_at=stop)
    collector.detach()
    collector.reduce()
    return collector.stats


def prune_layer_by_layer(
    pruner: Pruner,
    calibration: Batches,
    gradients: Grads = None,
    *,
    one_pass: bool = False,
    device: Device = None,
    store: str = "device",
    progress: bool = True,
    visit: Callable[[int], AbstractContextManager] | None = None,
) -> None:
    """Activation criteria one decoder layer at a time: layer ``i`` is scored on the inputs the already-pruned
    layers ``< i`` produce, pruned, and its pruned outputs feed layer ``i + 1`` (``device``: where layers are
    computed, visiting it one at a time). OWL's rates come from a first pass over the dense layers.

    ``one_pass`` (unstructured / N:M): the calibration set merged into one batch, each Linear pruned in its forward
    pre-hook on the statistics of the inputs it actually receives, then computing with its pruned weight, so every
    layer runs once (SparseGPT's "true sequential")."""
    model, structure = pruner.model, pruner.structure
    if gradients is not None:
        gradients.gather(pruner.targets.weights)
    if pruner.options.allocation == "owl":
        ratios: list[float] = []

        def owl_layer(i: int, forward_all: Callable) -> None:
            stats = layer_statistics(pruner, i, forward_all, plain=True)
            ratios.append(pruner.outlier_ratio(i, pruner.context(stats, gradients)))

        run_layerwise(
            model, structure, calibration, owl_layer, device=device, store=store, progress=progress, visit=visit
        )
        pruner.set_outlier_rates(ratios)

    def on_layer(i: int, forward_all: Callable) -> None:
        pruner.select_layer(i, pruner.context(layer_statistics(pruner, i, forward_all), gradients))
        pruner.apply(pruner.names_in(i))

    run_layerwise(
        model,
        structure,
        calibration,
        _one_pass_layer(pruner, gradients) if one_pass else on_layer,
        device=device,
        store=store,
        progress=progress,
        one_pass=one_pass,
        visit=visit,
    )


def _one_pass_layer(pruner: Pruner, gradients: Grads) -> Callable:
    """``on_layer`` of a one-pass run: each Linear of the layer pruned in its forward pre-hook."""

    def on_layer(i: int, forward_all: Callable) -> list:
        handles = {}

        def hook_for(name: str) -> Callable:
            def hook(module, args) -> None:
                handles.pop(name).remove()
                collector = pruner.activation_collector({name: module})
                collector.stats[name].update(args[0])
                collector.reduce()
                pruner.select_weight(name + ".weight", pruner.context(collector.stats, gradients), pruner.rate(i))
                pruner.apply([name + ".weight"])

            return hook

        for name, module in pruner.targets.modules_in(i).items():
            handles[name] = module.register_forward_pre_hook(hook_for(name))
        try:
            return forward_all(keep_outputs=True)
        finally:
            for h in handles.values():
                h.remove()

    return on_layer
