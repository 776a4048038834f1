"""One-shot pruning for plain PyTorch users: ``pruning.prune(model, calibration, method=..., sparsity=...)``."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .. import allocation as alloc
from ..importance import ScoreContext, get_criterion
from ..losses import collect_gradients
from ..masks import MaskSet, SparsityReport
from ..stats import ActivationCollector, ActivationStats, GradientCollector
from ..structure import GroupSet, ModelStructure
from .layerwise import run_layerwise

Granularity = Literal["unstructured", "2:4", "4:8", "mlp_neuron", "attention_head", "query_head", "layer"]
Allocation = Literal["uniform", "global", "owl", "rates"]
GRANULARITIES = ("unstructured", "2:4", "4:8", "mlp_neuron", "attention_head", "query_head", "layer")
STRUCTURED = ("mlp_neuron", "attention_head", "query_head", "layer")


@dataclass
class PruneResult:
    """What :func:`prune` did: the masks (already applied to the model), the sparsity report and a record of the
    method, the sparsity definition, per-layer outcome and the calibration data (count and sha256 of the ids)."""

    masks: MaskSet
    report: SparsityReport
    info: dict = field(default_factory=dict)


def calibration_fingerprint(batches: Sequence[torch.Tensor]) -> dict:
    h = hashlib.sha256()
    tokens = 0
    for b in batches:
        h.update(b.detach().to(torch.int64).cpu().contiguous().numpy().tobytes())
        tokens += b.numel()
    return {
        "batches": len(batches),
        "sequences": sum(b.shape[0] for b in batches),
        "tokens": tokens,
        "sha256": h.hexdigest(),
    }


def _parse_nm(granularity: str) -> tuple[int, int] | None:
    if ":" not in granularity:
        return None
    n, m = (int(x) for x in granularity.split(":"))
    return n, m


def _check_args(sparsity, granularity, allocation, scope, sparsity_basis, layer_rates, nm) -> None:
    if granularity not in GRANULARITIES and nm is None:
        raise ValueError(f"granularity={granularity!r} is not one of {list(GRANULARITIES)}")
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"granularity={granularity!r}: N:M needs 0 < N < M")
        if not math.isclose(sparsity, 1 - n / m):
            raise ValueError(
                f"sparsity={sparsity} contradicts granularity={granularity!r}, which prunes exactly {1 - n / m:g}"
                f". HINT: pass sparsity={1 - n / m:g} or leave the default."
            )
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    if allocation not in ("uniform", "global", "owl", "rates"):
        raise ValueError(f"allocation={allocation!r} must be 'uniform', 'global', 'owl' or 'rates'")
    if allocation == "rates" and layer_rates is None:
        raise ValueError("allocation='rates' needs layer_rates=[...] (one sparsity per decoder layer)")
    if scope not in (None, "row", "layer", "global"):
        raise ValueError(f"scope={scope!r} must be 'row', 'layer' or 'global'")
    if sparsity_basis not in ("targets", "model"):
        raise ValueError(f"sparsity_basis={sparsity_basis!r} must be 'targets' or 'model'")
    if nm is not None and allocation != "uniform":
        raise ValueError(f"granularity={granularity!r} fixes the pattern of every row: use allocation='uniform'")


def scores_layer_by_layer(
    method: str, granularity: str, allocation: str, scope: str | None, criterion_options: dict | None = None
) -> bool:
    """Whether :func:`prune` with the statistics given (``sequential=False``) reads each decoder layer's weights on
    their own — one layer scored and selected at a time, nothing shared across layers (``uniform`` or ``rates``
    allocation, not ``layer`` granularity or a global unstructured scope, no weight rewriting) — so that a
    ``layer_scope`` can hold one layer's weights at a time."""
    criterion = get_criterion(method, **dict(criterion_options or {}))
    structured = granularity in STRUCTURED
    return (
        allocation in ("uniform", "rates")
        and granularity != "layer"
        and not criterion.reconstructs
        and not (not structured and scope == "global")
    )


def prune(
    model: nn.Module,
    calibration: Iterable[torch.Tensor] | None = None,
    method: str = "wanda",
    sparsity: float = 0.5,
    granularity: Granularity = "unstructured",
    *,
    allocation: Allocation = "uniform",
    scope: Literal["row", "layer", "global"] | None = None,
    sparsity_basis: Literal["targets", "model"] = "targets",
    layer_rates: Sequence[float] | None = None,
    min_keep: float = 0.0,
    max_keep: float = 1.0,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    alpha: float = 0.0,
    temperature: float = 1.0,
    criterion_options: dict | None = None,
    gradients: GradientCollector | None = None,
    activations: ActivationCollector | dict[str, ActivationStats] | None = None,
    masks: MaskSet | None = None,
    monotone: bool = True,
    keep_original: bool = False,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
    sequential: bool = True,
    within_layer: Literal["dense", "sequential"] = "dense",
    device: torch.device | str | None = None,
    store: Literal["device", "cpu"] = "device",
    progress: bool = True,
    layer_scope: Callable[[int | None], AbstractContextManager] | None = None,
) -> PruneResult:
    """Score, select and apply masks in one call; afterwards ``model`` computes as the pruned model.

    - ``calibration``: iterable of token-id tensors ``[batch, seq]`` (needed by activation and gradient methods).
    - ``method``: a registered criterion (``magnitude``, ``wanda``, ``taylor``, ``gblm``, ``sdm``, ``sparsegpt``,
      ``mutual_info``, ...); ``criterion_options`` are its own knobs (e.g. ``{"alpha": 100, "gradient_norm": "l1"}``
      for gblm, ``{"percdamp": 0.01, "blocksize": 128}`` for sparsegpt, ``{"samples": 256, "cluster_size": 128}``
      for mutual_info).
    - ``sparsegpt`` also rewrites the weights it keeps (OBS reconstruction from each Linear's ``H = 2XXᵀ``):
      unstructured and N:M only, per layer (``uniform``, ``owl`` — outlier ratios from Wanda's scores — or
      ``rates``); its damping and Cholesky retries per weight are in ``result.info["diagnostics"]``.
    - ``granularity``: ``unstructured``, ``2:4``/``4:8`` (N:M over consecutive input columns), ``mlp_neuron``,
      ``attention_head`` (whole KV groups), ``query_head`` (same count per KV group) or ``layer``.
    - ``sparsity`` is a fraction of the targeted weights, or of all model parameters with
      ``sparsity_basis='model'`` (SDMPrune's definition); ``result.info`` says which.
    - ``allocation``: ``uniform`` (same fraction, and the same count kept, in every layer), ``global`` (one ranking
      across layers with ``min_keep``/``max_keep`` bounds), ``owl`` (outlier-weighted, ``owl_m``, ``owl_lambda``),
      ``rates`` (``layer_rates`` given, e.g. by a search).
    - ``scope`` (unstructured): the comparison group, ``row`` (default, Wanda's) / ``layer`` / ``global``.
    - Gradient methods compute their statistics from ``calibration`` (one backward per sequence) unless
      ``gradients`` is given; ``sdm`` uses ``alpha`` and ``temperature`` for its distillation loss, the teacher
      being the same model with the masks lifted.
    - ``activations``: activation statistics already accumulated (e.g. by the Lightning importance callback over
      training steps, whole model at once); then no calibration pass is run and selection is not layer-sequential.
    - Activation methods run one decoder layer at a time (``sequential``), calibration activations passing through
      the already-pruned layers; ``device`` may differ from where the model lives (layers visit it one by one).
    - ``within_layer`` (unstructured / N:M, layer-sequential): ``dense`` (Wanda's and SparseGPT's default protocol:
      every Linear of a layer scored on the dense layer's activations, then the layer's outputs recomputed with its
      pruned weights — two passes per layer) or ``sequential`` (SparseGPT's "true sequential": the calibration set
      merged into one batch, each Linear pruned just before it runs, on the inputs it actually receives from the
      already-pruned Linears before it — one pass per layer; memory holds the layer's activations for the whole
      calibration set at once).
    - ``layer_scope`` (statistics given, ``sequential=False``, :func:`scores_layer_by_layer` true): a context
      entered around the scoring of each decoder layer ``i`` and, with ``None``, of the targeted weights outside the
      layers; the weights are read inside it. Under FSDP2 it unshards that one module, so scoring holds one layer's
      full weights at a time, not the whole model. The masks are applied after the last scope has closed. Gradient
      statistics reduced with ``lazy=True`` (row-sharded) are gathered whole inside each scope, for that scope's
      weights only, and freed after it (see :meth:`GradientCollector.whole`); without ``layer_scope`` they are
      gathered at once.
    """
    nm = _parse_nm(granularity)
    _check_args(sparsity, granularity, allocation, scope, sparsity_basis, layer_rates, nm)
    if within_layer not in ("dense", "sequential"):
        raise ValueError(f"within_layer={within_layer!r} must be 'dense' or 'sequential'")
    if within_layer == "sequential" and (granularity in STRUCTURED or allocation in ("global", "owl")):
        raise ValueError(
            f"within_layer='sequential' prunes each Linear on its own as the layer runs: it supports unstructured "
            f"and N:M granularities with allocation 'uniform' or 'rates', not granularity={granularity!r}, "
            f"allocation={allocation!r}. HINT: use within_layer='dense'"
        )
    structure = ModelStructure(model)
    opts = dict(criterion_options or {})
    criterion = get_criterion(method, **opts)
    criterion.check_granularity(granularity)
    structured = granularity in STRUCTURED
    scope = scope or ("row" if not structured else None)
    calib = [] if calibration is None else [c if c.dim() == 2 else c.unsqueeze(0) for c in calibration]
    if isinstance(activations, ActivationCollector):
        activations = activations.stats
    if (
        (criterion.needs_activations and activations is None) or (criterion.needs_gradients and gradients is None)
    ) and not calib:
        raise ValueError(f"method={method!r} needs calibration data: pass calibration=[token-id tensors]")
    for c in calib:
        if c.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"calibration tensors must hold token ids (int64), got {c.dtype}")
    if layer_scope is not None and (
        sequential or calibration is not None or not scores_layer_by_layer(method, granularity, allocation, scope, opts)
    ):
        raise ValueError(
            f"layer_scope scores one decoder layer at a time from given statistics; method={method!r}, granularity="
            f"{granularity!r}, allocation={allocation!r}, scope={scope!r} (sequential={sequential}) needs every "
            "layer's weights at once. HINT: pass layer_scope only when scores_layer_by_layer(...) is true, with "
            "sequential=False and no calibration"
        )
    if method != "sdm" and alpha != 0:
        raise ValueError(f"alpha={alpha} is the distillation weight of method='sdm'; {method!r} scores with CE")
    if criterion.needs_activations and (include_embeddings or include_lm_head):
        raise ValueError(
            f"method={method!r} needs Linear inputs: embeddings/lm_head can only be targeted by "
            "gradient or magnitude criteria"
        )
    if not criterion.global_ranking and (allocation == "global" or scope == "global"):
        raise ValueError(
            f"method={method!r} scores each layer on its own terms (per-layer reconstruction or ranks): "
            "there is no global ranking. HINT: use allocation='uniform', 'owl' or 'rates'"
            + (", scope='row' or 'layer'" if not structured else "")
        )
    if criterion.reconstructs and keep_original:
        raise ValueError(
            f"method={method!r} also changes the weights it keeps, so the lifted teacher "
            "(keep_original=True) would not be the original model. HINT: keep a separate teacher"
        )
    masks = masks if masks is not None else MaskSet()
    info: dict = {
        "method": method,
        "criterion_options": opts,
        "granularity": granularity,
        "sparsity": sparsity,
        "sparsity_basis": sparsity_basis,
        "allocation": allocation,
        "scope": scope,
        "within_layer": within_layer,
        "calibration": calibration_fingerprint(calib) if calib else None,
    }
    if method == "sdm":
        info.update(alpha=alpha, temperature=temperature)

    # ---- what is targeted
    if structured:
        group_sets = structure.group_sets(granularity)  # type: ignore[arg-type]
        target_names = sorted({m.name for gs in group_sets for m in gs.members})
        targeted = sum(sum(gs.numels) for gs in group_sets)
        modules = {m.name.rsplit(".", 1)[0]: None for gs in group_sets for m in gs.members}
        act_modules = {n: model.get_submodule(n) for n in modules}
    else:
        group_sets = []
        tmods = structure.targets(include_embeddings, include_lm_head)
        target_names = [n + ".weight" for n in tmods]
        targeted = sum(model.get_parameter(n).numel() for n in target_names)
        act_modules = dict(tmods)
    total = structure.num_parameters()
    frac = sparsity
    if sparsity_basis == "model":
        frac = sparsity * total / targeted
        if frac >= 1:
            raise ValueError(
                f"sparsity={sparsity} of all {total} parameters exceeds the {targeted} targeted ones. "
                "HINT: lower sparsity or use sparsity_basis='targets'"
            )
    info["targeted_fraction"] = frac
    info["targeted_parameters"] = targeted

    # ---- gradients (whole model, dense or as currently masked)
    ctx_grad, ctx_group = {}, {}
    if criterion.needs_gradients:
        if gradients is None:
            gradients = GradientCollector(
                model,
                param_names=target_names if criterion.grad_kinds else (),
                grad_kinds=criterion.grad_kinds or ("sum",),
                group_sets=group_sets if criterion.group_kinds else (),
                group_kinds=criterion.group_kinds or ("coupled",),
            )
            collect_gradients(
                model,
                calib,
                gradients,
                alpha=alpha,
                temperature=temperature,
                masks=masks,
                device=device,
                progress=progress,
            )
            gradients.reduce()
        ctx_grad, ctx_group = gradients.stats, gradients.group_stats
    if gradients is not None and layer_scope is None:  # lazily reduced statistics (see layer_scope): whole now
        gradients.gather(target_names)

    weights = {n: p for n, p in model.named_parameters(remove_duplicate=False)}

    def context(acts=None) -> ScoreContext:
        return ScoreContext(weights=weights, act=acts or {}, grad=ctx_grad, group=ctx_group)

    def prev(name):
        return masks.keep_mask(name, weights[name]) if name in masks.names() else None

    layered = (
        sequential
        and criterion.needs_activations
        and activations is None
        and granularity != "layer"
        and allocation != "global"
        and scope != "global"
    )
    rates: list[float] | None = None
    if allocation == "rates":
        rates = [float(r) for r in layer_rates]  # type: ignore[union-attr]
        if len(rates) != structure.num_layers or not all(0 <= r < 1 for r in rates):
            raise ValueError(f"layer_rates needs {structure.num_layers} values in [0, 1), got {rates}")

    def layer_modules(i):
        return {n: m for n, m in act_modules.items() if structure.layer_of(n) == i}

    if allocation == "owl":
        ratios: list[float] = []

        def owl_layer(i, forward_all):
            use = criterion.needs_activations and activations is None
            coll = ActivationCollector(layer_modules(i)).attach() if use else None
            if coll:
                forward_all(stop_at=structure.linear(i, structure.family.mlp_out))
                coll.detach()
                coll.reduce()
            ctx = context(coll.stats if coll else activations)
            names = [n + ".weight" for n in layer_modules(i)]
            ratios.append(alloc.outlier_ratio([criterion.element_scores(n, ctx) for n in names], owl_m))

        if criterion.needs_activations and activations is None:
            run_layerwise(model, structure, calib, owl_layer, device=device, store=store, progress=progress)
        else:
            for i in range(structure.num_layers):
                owl_layer(i, lambda: None)
        rates = alloc.owl_rates(ratios, frac, owl_lambda)
        info["owl_outlier_ratios"] = ratios
    if rates is not None:
        info["layer_rates"] = rates

    kept: dict[int, int] = {}

    def select_layer(i: int, ctx: ScoreContext) -> None:
        """Masks for decoder layer ``i`` (uniform, rates or OWL allocations)."""
        rate = frac if rates is None else rates[i]
        if structured:
            gs = group_sets[i]
            scores = alloc._exclude_pruned(criterion.group_scores(gs, ctx).float(), masks.groups.get(gs.key))
            keep_n = alloc.keep_counts_uniform([gs.count], rate, gs.partitions)[0]
            keep_n = max(keep_n, criterion.min_keep_count(gs))  # a criterion's own stopping rule (MI threshold)
            masks.set_groups(gs, alloc.topk_keep(scores, keep_n, gs.partitions), monotone)
            kept[i] = int(masks.groups[gs.key].sum())
            return
        for name in target_names:
            if structure.layer_of(name) == i:
                select_weight(name, ctx, rate)

    def select_weight(name: str, ctx: ScoreContext, rate: float) -> None:
        """Element mask of one weight (unstructured or N:M)."""
        if criterion.reconstructs:  # SparseGPT: the mask and the new values of the kept weights together
            keep, new, _ = criterion.prune_weight(name, ctx, rate, nm, scope, prev(name))
            with torch.no_grad():
                weights[name].copy_(new.to(weights[name].device, weights[name].dtype))
            masks.set_element(name, keep, monotone)
            return
        scores = criterion.element_scores(name, ctx)
        keep = (
            alloc.select_nm(scores, *nm, prev(name))
            if nm
            else alloc.select_unstructured(scores, rate, scope, prev(name))
        )
        masks.set_element(name, keep, monotone)

    if layered and within_layer == "sequential":
        opts = criterion.collector_options()

        def on_layer_one_pass(i, forward_all):
            """Each Linear is pruned in its own forward pre-hook, on the statistics of the inputs it actually
            receives (the whole calibration set, merged into one batch), then computes with its pruned weight."""
            rate = frac if rates is None else rates[i]
            handles = {}

            def hook_for(mname):
                def hook(module, args):
                    handles.pop(mname).remove()
                    coll = ActivationCollector({mname: module}, **opts)
                    coll.stats[mname].update(args[0])
                    coll.reduce()
                    select_weight(mname + ".weight", context(coll.stats), rate)
                    masks.apply(model, keep_original, only=[mname + ".weight"])

                return hook

            for mname, module in layer_modules(i).items():
                handles[mname] = module.register_forward_pre_hook(hook_for(mname))
            try:
                return forward_all(keep_outputs=True)
            finally:
                for h in handles.values():
                    h.remove()

        run_layerwise(
            model, structure, calib, on_layer_one_pass, device=device, store=store, progress=progress, one_pass=True
        )
    elif layered:

        def on_layer(i, forward_all):
            coll = ActivationCollector(layer_modules(i), **criterion.collector_options()).attach()
            # the statistics pass ends at the MLP output projection's input: its output is recomputed after pruning
            forward_all(stop_at=structure.linear(i, structure.family.mlp_out))
            coll.detach()
            coll.reduce()
            select_layer(i, context(coll.stats))
            masks.apply(model, keep_original, only=[n for n in masks.names() if structure.layer_of(n) == i])

        run_layerwise(model, structure, calib, on_layer, device=device, store=store, progress=progress)
    elif layer_scope is not None:
        ctx = context(activations)
        outside = [n for n in target_names if structure.layer_of(n) is None]

        def stats_of(names: list[str]) -> AbstractContextManager:
            return gradients.whole(names) if gradients is not None else nullcontext()

        for i in range(structure.num_layers):
            with layer_scope(i), stats_of([n for n in target_names if structure.layer_of(n) == i]):
                weights.update(_named_in(model, structure, i))  # the parameters registered inside the scope
                select_layer(i, ctx)
        if outside:
            with layer_scope(None), stats_of(outside):
                weights.update(_named_in(model, structure, None))
                for name in outside:  # embeddings / lm_head: their own comparison group
                    keep = alloc.select_unstructured(criterion.element_scores(name, ctx), frac, scope, prev(name))
                    masks.set_element(name, keep, monotone)
        weights.update(model.named_parameters(remove_duplicate=False))
        masks.apply(model, keep_original=keep_original)
    else:
        acts = activations
        if criterion.needs_activations and acts is None:
            coll = ActivationCollector(act_modules, **criterion.collector_options()).attach()
            dev = torch.device(device) if device is not None else next(model.parameters()).device
            was = model.training
            model.eval()
            with torch.no_grad():
                for ids in calib:
                    model(input_ids=ids.to(dev), use_cache=False)
            model.train(was)
            coll.detach()
            coll.reduce()
            acts = coll.stats
        ctx = context(acts)
        if granularity == "layer":
            _select_layers(structure, group_sets, criterion, ctx, frac, masks, monotone, kept)
        elif structured and allocation == "global":
            scores = [criterion.group_scores(gs, ctx) for gs in group_sets]
            counts = alloc.keep_counts_global(
                scores,
                frac,
                min_keep,
                max_keep,
                [masks.groups.get(gs.key) for gs in group_sets],
                partitions=group_sets[0].partitions,
            )
            for gs, s, k in zip(group_sets, scores, counts):
                s = alloc._exclude_pruned(s.float(), masks.groups.get(gs.key))
                masks.set_groups(gs, alloc.topk_keep(s, k, gs.partitions), monotone)
                kept[gs.layer] = int(masks.groups[gs.key].sum())
        elif not structured and (allocation == "global" or scope == "global"):
            scores = {n: criterion.element_scores(n, ctx) for n in target_names}
            for n, keep in alloc.select_global_unstructured(scores, frac, {n: prev(n) for n in scores}).items():
                masks.set_element(n, keep, monotone)
        else:
            for i in range(structure.num_layers):
                select_layer(i, ctx)
            for name in (n for n in target_names if structure.layer_of(n) is None):
                keep = alloc.select_unstructured(criterion.element_scores(name, ctx), frac, scope, prev(name))
                masks.set_element(name, keep, monotone)  # embeddings / lm_head: their own comparison group
        masks.apply(model, keep_original=keep_original)

    if kept:
        info["kept_groups_per_layer"] = kept
    if getattr(criterion, "diagnostics", None):  # e.g. SparseGPT's damping/retries, MI's clusters and timings
        info["diagnostics"] = dict(criterion.diagnostics)
    report = masks.report(model, targets=target_names)
    info["report"] = {"targeted": report.targeted.as_dict(), "model": report.model.as_dict()}
    return PruneResult(masks=masks, report=report, info=info)


def _named_in(model: nn.Module, structure: ModelStructure, layer: int | None) -> dict[str, torch.Tensor]:
    """The parameters of decoder layer ``layer`` (``None``: those outside every layer) as registered now."""
    return {n: p for n, p in model.named_parameters(remove_duplicate=False) if structure.layer_of(n) == layer}


def _select_layers(structure, group_sets: list[GroupSet], criterion, ctx, frac, masks, monotone, kept) -> None:
    """Whole decoder layers: the ``round(frac · L)`` lowest-scoring layers go."""
    scores = torch.stack([criterion.group_scores(gs, ctx).float().cpu().reshape(()) for gs in group_sets])
    prev = torch.stack(
        [masks.groups.get(gs.key, torch.ones(1, dtype=torch.bool)).cpu().reshape(()) for gs in group_sets]
    )
    scores = scores.masked_fill(~prev, float("-inf"))
    n_drop = int(math.floor(frac * len(group_sets) + 1e-9))
    drop = set(torch.topk(scores, n_drop, largest=False).indices.tolist()) if n_drop else set()
    for gs in group_sets:
        masks.set_groups(gs, torch.tensor([gs.layer not in drop]), monotone)
        kept[gs.layer] = int(masks.groups[gs.key].sum())
