"""One-shot pruning for plain PyTorch users: ``pruning.prune(model, calibration, method=..., sparsity=...)``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
from torch import nn

from ..masks import MaskSet
from ..options import GRANULARITIES, Granularity, PruneOptions
from ..stats import ActivationCollector, ActivationStats, GradientCollector
from .calibration import calibration_batches, calibration_fingerprint, check_calibration, collect_gradients
from .drive import collect_activations, prune_from_statistics, prune_layer_by_layer
from .frompath import prune_checkpoint
from .pruner import Pruner, PruneResult
from .streamed import collect_gradients_layerwise, streams

__all__ = ["GRANULARITIES", "PruneResult", "calibration_fingerprint", "prune"]


def prune(
    model: nn.Module | str | os.PathLike,
    calibration: Iterable[torch.Tensor] | None = None,
    method: str | None = None,
    sparsity: float | None = None,
    granularity: str | None = None,
    *,
    options: PruneOptions | None = None,
    masks: MaskSet | None = None,
    gradients: GradientCollector | None = None,
    activations: ActivationCollector | dict[str, ActivationStats] | None = None,
    keep_original: bool = False,
    device: torch.device | str | None = None,
    store: str = "device",
    progress: bool = True,
    save_to: str | os.PathLike | None = None,
    **fields,
) -> PruneResult:
    """Score, select and apply masks in one call; afterwards ``model`` computes as the pruned model.

    - ``calibration``: token-id tensors ``[batch, seq]`` (activation and gradient criteria need them).
    - ``method`` (default ``wanda``), ``sparsity`` (default 0.5, or what an N:M granularity prunes),
      ``granularity`` (default ``unstructured``) and every other field of :class:`~pruning.options.PruneOptions`
      (``allocation``, ``scope``, ``sparsity_basis``, ``layer_rates`` / ``rates_file``, ``criterion_options``,
      ``alpha`` / ``temperature`` for distilling criteria, ``sequential``, ``within_layer``, ...) as keywords, or
      ``options=PruneOptions(...)`` (keywords given as well replace its fields).
    - ``gradients`` / ``activations``: statistics already collected (e.g. over training steps); then no calibration
      pass is run for them. Gradient criteria otherwise backpropagate once per calibration tensor, each sequence's
      gradient taken from that batched backward; ``sdm``'s loss uses ``alpha`` / ``temperature``, the teacher being
      the same model with the masks lifted.
    - Activation criteria run one decoder layer at a time (``sequential``), the calibration activations passing
      through the already-pruned layers; ``device`` may differ from where the model lives (layers visit it one by
      one; ``store='cpu'`` keeps the hidden states on the host); so do gradient criteria's: forward layer by layer,
      then backward layer by layer from each layer's stored input (:mod:`pruning.pipeline.streamed`).
    - ``masks``: earlier masks to continue (monotone); without them, what an earlier pruning left (whole groups,
      or weights more than 1 % exactly zero) is continued. ``keep_original`` stashes the pruned values (the lifted
      teacher of self-distillation needs them).
    - ``sparsegpt`` also rewrites the weights it keeps; its damping and retries per weight are in
      ``result.info["diagnostics"]``.
    - ``model`` may be the local path of a Hugging Face checkpoint (safetensors) instead, for models larger than
      the host's memory: its layers are read one at a time, and ``save_to=DIR`` writes the pruned model there
      (compacted for structured granularities) shard by shard (:mod:`pruning.pipeline.frompath`).
    """
    opts = _options(options, method, sparsity, granularity, fields)
    if isinstance(model, (str, os.PathLike)):
        given = [k for k, v in (("masks", masks), ("gradients", gradients), ("activations", activations)) if v]
        if given or keep_original:
            raise ValueError(
                f"prune(path) streams a checkpoint from disk; {given or ['keep_original']} need a model in memory. "
                "HINT: load the model first, or leave them out"
            )
        store = "cpu" if store == "device" else store
        return prune_checkpoint(
            model, calibration, opts, save_to=save_to, device=device, store=store, progress=progress
        )
    if save_to is not None:
        raise ValueError(
            "save_to= writes a pruned checkpoint streamed from its path. HINT: for a model in memory call "
            "pruning.compact(model, result.masks) and pruning.save_pretrained(model, DIR)"
        )
    pruner = Pruner(model, opts, masks, keep_original)
    if masks is None:
        pruner.continue_from_zeros()  # pruned before without passing masks=: continue monotonically
    calib = calibration_batches(calibration)
    check_calibration(calib, model)
    if isinstance(activations, ActivationCollector):
        activations = activations.stats
    crit = pruner.criterion
    if not calib and ((crit.needs_activations and activations is None) or (crit.needs_gradients and gradients is None)):
        raise ValueError(f"method={opts.method!r} needs calibration data: pass calibration=[token-id tensors]")
    pruner.info["calibration"] = calibration_fingerprint(calib) if calib else None
    if crit.needs_gradients and gradients is None:
        gradients = pruner.gradient_collector()
        # the model elsewhere than `device`: its layers visit the device one at a time, the backward too
        collect = collect_gradients_layerwise if streams(model, device) else collect_gradients
        collect(
            model,
            calib,
            gradients,
            alpha=opts.alpha,
            temperature=opts.temperature,
            kl_positions=opts.kl_positions,
            masks=pruner.masks,
            device=device,
            progress=progress,
        )
        gradients.reduce()
    if crit.needs_activations and activations is None and opts.sequential and pruner.selects_layer_by_layer:
        one_pass = opts.within_layer == "sequential"
        prune_layer_by_layer(pruner, calib, gradients, one_pass=one_pass, device=device, store=store, progress=progress)
    else:
        if crit.needs_activations and activations is None:
            activations = collect_activations(pruner, calib, device)
        prune_from_statistics(pruner, activations, gradients)
    return pruner.result()


def _options(
    options: PruneOptions | None, method: str | None, sparsity: float | None, granularity: str | None, fields: dict
) -> PruneOptions:
    """The options of a :func:`prune` call: ``options`` with the keywords given replacing its fields, or the
    keywords on the defaults (an N:M granularity's sparsity is what it prunes)."""
    given = {
        k: v for k, v in (("method", method), ("sparsity", sparsity), ("granularity", granularity)) if v is not None
    }
    given.update(fields)
    unknown = set(given) - {f.name for f in dataclasses.fields(PruneOptions)}
    if unknown:
        raise TypeError(f"prune() got unknown option(s) {sorted(unknown)}; see pruning.PruneOptions for the fields")
    if options is not None:
        return dataclasses.replace(options, **given)
    if "sparsity" not in given and "granularity" in given:
        fixed = Granularity.parse(given["granularity"]).fixed_sparsity
        if fixed is not None:
            given["sparsity"] = fixed
    return PruneOptions(**given)
