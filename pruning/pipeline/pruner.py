"""The stages of one pruning event, as methods of one object: plan → statistics → score → select → apply.

:func:`pruning.prune` calls them in a row (:mod:`pruning.pipeline.oneshot`); the Lightning callbacks call them at
their events with statistics collected over training steps (:mod:`pruning.pipeline.event`); a plain PyTorch loop
can call them too. How the stages are driven (the whole model at once, or one decoder layer at a time with the
calibration data flowing through the already-pruned layers) is :mod:`pruning.pipeline.drive`'s business, not a
branch in here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import allocation as alloc
from ..allocation.rates import load_rates_file
from ..importance import ScoreContext
from ..masks import MaskSet, SparsityReport
from ..options import PruneOptions
from ..stats import ActivationCollector, ActivationStats, GradientCollector
from ..structure import GroupSet, ModelStructure, config_value
from .targets import existing_zeros, plan_targets


@dataclass
class PruneResult:
    """What a pruning event did: the masks (already applied to the model), the sparsity report and a record of the
    method, the options, the sparsity definition, per-layer outcome and the calibration data (count and sha256)."""

    masks: MaskSet
    report: SparsityReport
    info: dict = field(default_factory=dict)


class Pruner:
    """One pruning event on one model.

    Built from the model and the :class:`~pruning.options.PruneOptions`, it plans the targets; then
    :meth:`gradient_collector` / :meth:`activation_collector` say what statistics the criterion needs, the
    ``select_*`` methods turn statistics (a :class:`ScoreContext`) into masks, and :meth:`apply` zeroes what they
    remove. ``masks`` (default: new) are continued monotonically; ``keep_original`` stashes the pruned values for the
    lifted teacher.
    """

    def __init__(
        self, model: nn.Module, options: PruneOptions, masks: MaskSet | None = None, keep_original: bool = False
    ) -> None:
        self.model = model
        self.structure = ModelStructure(model)
        self.options = self._with_rates(options)
        self.criterion = self.options.criterion()
        if self.criterion.reconstructs and keep_original:
            raise ValueError(
                f"method={options.method!r} also changes the weights it keeps, so the lifted teacher "
                "(keep_original=True) would not be the original model. HINT: keep a separate teacher"
            )
        self.keep_original = keep_original
        self.targets = plan_targets(self.structure, self.options)
        self.masks = masks if masks is not None else MaskSet()
        self.fraction = self.targets.fraction(self.options.sparsity, self.options.sparsity_basis)
        self.rates: list[float] | None = self.options.layer_rates
        self.weights = dict(model.named_parameters(remove_duplicate=False))
        self.kept: dict[int | str, int] = {}  # by layer (by group-set key for a joint granularity)
        self.info: dict = {
            **self.options.record(),
            "method": self.options.method,
            "targeted_fraction": self.fraction,
            "targeted_parameters": self.targets.parameters,
        }
        if self.rates is not None:
            self.info["layer_rates"] = self.rates
        if self.options.unit.name == "expert":
            self._check_top_k()

    @property
    def top_k(self) -> int:
        """Experts each token is routed to (``num_experts_per_tok``; 1 without)."""
        return int(config_value(self.structure.config, "num_experts_per_tok", 1) or 1)

    def _check_top_k(self) -> None:
        """Every mixture-of-experts layer keeps at least the experts each token is routed to (top-k); a global
        ranking keeps them by its lower bound per layer, and the whole model's share is checked."""
        top_k, sets = self.top_k, self.targets.group_sets
        if self.options.allocation == "global":
            total = sum(gs.count for gs in sets)
            keep = alloc.keep_counts_uniform([total], self.fraction)[0]
            if keep < top_k * len(sets):
                raise ValueError(
                    f"sparsity={self.options.sparsity} leaves {keep} of the {total} experts of the model, fewer than "
                    f"the {top_k} per layer each token is routed to (num_experts_per_tok). HINT: lower sparsity"
                )
            return
        for gs in sets:
            keep = alloc.keep_counts_uniform([gs.count], self.rate(gs.layer))[0]
            if keep < top_k:
                what = "sparsity" if self.rates is None else "layer_rates"
                raise ValueError(
                    f"{what}={self.options.sparsity if self.rates is None else self.rates} leaves {keep} of the "
                    f"{gs.count} experts of layer {gs.layer}, fewer than the {top_k} each token is routed to "
                    f"(num_experts_per_tok). HINT: lower it to at most {(gs.count - top_k) / gs.count:g}"
                )

    def _with_rates(self, options: PruneOptions) -> PruneOptions:
        """``layer_rates`` checked against the model (read from ``rates_file`` first, with what it learned)."""
        layers = self.structure.num_layers
        if options.rates_file is not None:
            rates, learned = load_rates_file(options.rates_file, options.method, str(options.unit), layers)
            options = options.with_rates(rates, learned)  # type: ignore[assignment]
        rates = options.layer_rates
        if rates is not None and (len(rates) != layers or not all(0 <= r < 1 for r in rates)):
            raise ValueError(f"layer_rates needs {layers} values in [0, 1), got {rates}")
        return options

    def continue_from_zeros(self) -> None:
        """Start from what an earlier pruning left in the targeted weights (:func:`existing_zeros`), so that pruning a
        model twice is monotone even without the first call's masks."""
        zeros = existing_zeros(self.model, self.targets)
        for key, keep in zeros.groups.items():
            self.masks.set_groups(zeros.group_sets[key], keep)
        for name, keep in zeros.element.items():
            self.masks.set_element(name, keep)
        if len(zeros):
            self.info["continued_from_zeros"] = sorted(zeros.names())

    # ---------------------------------------------------------------------------------------------- statistics
    def gradient_collector(self) -> GradientCollector | None:
        """A collector of the per-sample gradient statistics the criterion reads (``None``: it reads none)."""
        crit = self.criterion
        if not crit.needs_gradients:
            return None
        group_kinds = crit.group_statistics(self.options.unit.name)
        return GradientCollector(
            self.model,
            param_names=self.targets.weights if crit.grad_kinds else (),
            grad_kinds=crit.grad_kinds or ("sum",),
            group_sets=self.targets.group_sets if group_kinds else (),
            group_kinds=group_kinds or ("coupled",),
        )

    def activation_collector(self, modules: dict[str, nn.Module] | None = None) -> ActivationCollector | None:
        """A collector of the input statistics the criterion reads for ``modules`` (default: every targeted one)."""
        if not self.criterion.needs_activations:
            return None
        return ActivationCollector(
            self.targets.modules if modules is None else modules, **self.criterion.collector_options()
        )

    @property
    def selects_layer_by_layer(self) -> bool:
        """Whether selection can run one decoder layer at a time (no ranking across layers)."""
        return not self.options.ranks_across_layers

    # ---------------------------------------------------------------------------------------------- score
    def context(
        self, activations: dict[str, ActivationStats] | None = None, gradients: GradientCollector | None = None
    ) -> ScoreContext:
        """What the criterion may read: the weights and the statistics."""
        return ScoreContext(
            weights=self.weights,
            act=activations or {},
            grad=gradients.stats if gradients is not None else {},
            group=gradients.group_stats if gradients is not None else {},
        )

    def refresh_weights(self, layer: int | None | str = "all") -> None:
        """Read the parameters of decoder layer ``layer`` (``None``: outside the layers; default: all) as registered
        now (FSDP2 registers unsharded parameters while a module is unsharded)."""
        for n, p in self.model.named_parameters(remove_duplicate=False):
            if layer == "all" or self.structure.layer_of(n) == layer:
                self.weights[n] = p

    def outlier_ratio(self, layer: int, ctx: ScoreContext) -> float:
        """OWL's outlier ratio of decoder layer ``layer``: the share of its element scores above ``owl_m`` times
        their mean."""
        scores = [self.criterion.element_scores(n, ctx) for n in self.targets.weights_in(layer)]
        return alloc.outlier_ratio(scores, self.options.owl_m)

    def set_outlier_rates(self, ratios: list[float]) -> list[float]:
        """OWL's per-layer rates from the layers' outlier ratios (mean = the target), as this event's rates."""
        self.rates = alloc.owl_rates(ratios, self.fraction, self.options.owl_lambda)
        self.info.update(owl_outlier_ratios=ratios, layer_rates=self.rates)
        return self.rates

    # ---------------------------------------------------------------------------------------------- select
    def previous(self, name: str) -> torch.Tensor | None:
        """The keep mask ``name`` already has (monotone selection), if any."""
        return self.masks.keep_mask(name, self.weights[name]) if name in self.masks.names() else None

    def rate(self, layer: int) -> float:
        return self.fraction if self.rates is None else self.rates[layer]

    def select_layer(self, layer: int | None, ctx: ScoreContext) -> None:
        """Masks of decoder layer ``layer`` (``None``: the targeted weights outside the layers, each its own
        comparison group) at its rate."""
        if layer is None:  # embeddings / LM head: each its own comparison group, never N:M or rewritten
            for name in self.targets.weights_in(None):
                scores = self.criterion.element_scores(name, ctx)
                keep = alloc.select_unstructured(
                    scores, self.fraction, self.options.comparison_scope, self.previous(name)
                )
                self.masks.set_element(name, keep, self.options.monotone)
            return
        if not self.targets.group_sets:
            for name in self.targets.weights_in(layer):
                self.select_weight(name, ctx, self.rate(layer))
            return
        sets = self.targets.sets_in(layer)
        if len(sets) > 1:  # a joint granularity: the layer's MLP neurons and KV groups share its budget
            self.select_joint(sets, ctx, self.rate(layer))
            return
        gs = sets[0]
        keep_n = alloc.keep_counts_uniform([gs.count], self.rate(layer), gs.partitions)[0]
        ctx.keep[gs.key] = keep_n  # a criterion whose procedure stops at the target reads it
        scores = alloc.exclude_pruned(self.criterion.group_scores(gs, ctx).float(), self.masks.groups.get(gs.key))
        keep_n = max(keep_n, self.criterion.min_keep_count(gs))  # a criterion's own stopping rule (MI threshold)
        self.masks.set_groups(gs, alloc.topk_keep(scores, keep_n, gs.partitions), self.options.monotone)
        self.kept[layer] = int(self.masks.groups[gs.key].sum())

    def select_joint(self, sets: list[GroupSet], ctx: ScoreContext, rate: float) -> None:
        """Group sets of different kinds under one budget, ``rate`` of their parameters: the groups of lowest
        importance per parameter go first (:meth:`Criterion.group_densities`, :func:`allocation.joint_keep`)."""
        budget = int(math.floor(rate * sum(sum(gs.numels) for gs in sets) + 1e-9))
        keeps, removed = alloc.joint_keep(
            self.criterion.group_densities(sets, ctx),
            [gs.params_per_group for gs in sets],
            budget,
            [self.masks.groups.get(gs.key) for gs in sets],
            [gs.partitions for gs in sets],
        )
        for gs, keep in zip(sets, keeps):
            self.masks.set_groups(gs, keep, self.options.monotone)
            self.kept[gs.key] = int(self.masks.groups[gs.key].sum())
        layers = sorted({gs.layer for gs in sets})
        scope = layers[0] if len(layers) == 1 else "model"
        self.info.setdefault("joint_budgets", {})[scope] = {"budget": budget, "removed": removed}

    def select_weight(self, name: str, ctx: ScoreContext, rate: float) -> None:
        """The element mask of one weight (unstructured or N:M); a reconstructing criterion (SparseGPT) also
        rewrites the weights it keeps."""
        nm, prev = self.options.unit.nm, self.previous(name)
        if self.criterion.reconstructs:
            keep, new, _ = self.criterion.prune_weight(name, ctx, rate, nm, self.options.comparison_scope, prev)
            with torch.no_grad():
                self.weights[name].copy_(new.to(self.weights[name].device, self.weights[name].dtype))
        else:
            scores = self.criterion.element_scores(name, ctx)
            if nm:
                keep = alloc.select_nm(scores, *nm, prev)
            else:
                keep = alloc.select_unstructured(scores, rate, self.options.comparison_scope, prev)
        self.masks.set_element(name, keep, self.options.monotone)

    def group_scores_in(self, layer: int, ctx: ScoreContext) -> list[torch.Tensor]:
        """The scores of decoder layer ``layer``'s group sets (on the host): what a global ranking of groups reads
        of that layer (a driver streaming the layers gathers them one layer at a time)."""
        return [self.criterion.group_scores(gs, ctx).float().cpu() for gs in self.targets.sets_in(layer)]

    def select_across_layers(self, ctx: ScoreContext, scores: list[torch.Tensor] | None = None) -> None:
        """Selection that compares scores of different layers: whole layers, a global ranking of groups (``scores``:
        those of every group set, in order, computed already), or one unstructured threshold over every targeted
        weight."""
        t, o = self.targets, self.options
        if o.unit.name == "layer":
            self._select_whole_layers(ctx)
        elif o.unit.joint:
            self.select_joint(t.group_sets, ctx, self.fraction)
        elif t.group_sets:
            if scores is None:
                scores = [self.criterion.group_scores(gs, ctx) for gs in t.group_sets]
            previous = [self.masks.groups.get(gs.key) for gs in t.group_sets]
            partitions = t.group_sets[0].partitions
            heads = o.unit.name in ("attention_head", "query_head")  # every layer keeps attention: one group at least
            least = self.top_k if o.unit.name == "expert" else int(heads)  # and the experts a token is routed to
            counts = alloc.keep_counts_global(
                scores, self.fraction, o.min_keep, o.max_keep, previous, partitions, min_units=least
            )
            for gs, s, k in zip(t.group_sets, scores, counts):
                s = alloc.exclude_pruned(s.float(), self.masks.groups.get(gs.key))
                self.masks.set_groups(gs, alloc.topk_keep(s, k, gs.partitions), o.monotone)
                self.kept[gs.layer] = int(self.masks.groups[gs.key].sum())
        else:
            scores = {n: self.criterion.element_scores(n, ctx) for n in t.weights}
            keeps = alloc.select_global_unstructured(scores, self.fraction, {n: self.previous(n) for n in scores})
            for n, keep in keeps.items():
                self.masks.set_element(n, keep, o.monotone)

    def _select_whole_layers(self, ctx: ScoreContext) -> None:
        """Whole decoder layers: the ``floor(fraction · L)`` lowest-scoring layers go."""
        sets = self.targets.group_sets
        scores = torch.stack([self.criterion.group_scores(gs, ctx).float().cpu().reshape(()) for gs in sets])
        kept = [self.masks.groups.get(gs.key, torch.ones(1, dtype=torch.bool)).cpu().reshape(()) for gs in sets]
        drop = alloc.lowest_layers(scores, torch.stack(kept), self.fraction)
        for gs in sets:
            self.masks.set_groups(gs, torch.tensor([gs.layer not in drop]), self.options.monotone)
            self.kept[gs.layer] = int(self.masks.groups[gs.key].sum())

    # ---------------------------------------------------------------------------------------------- apply
    def apply(self, names: Iterable[str] | None = None) -> None:
        """Zero what the masks remove, in place (of the parameters named, default all)."""
        self.masks.apply(self.model, keep_original=self.keep_original, only=names)

    def names_in(self, layer: int) -> list[str]:
        """Masked parameters of decoder layer ``layer``."""
        return [n for n in self.masks.names() if self.structure.layer_of(n) == layer]

    def result(self, report: SparsityReport | None = None) -> PruneResult:
        """The masks, the sparsity report (``report``: made already, by a driver that streams the layers) and the
        record of this event."""
        info = dict(self.info)
        if self.kept:
            info["kept_groups_per_layer"] = dict(self.kept)
        if getattr(self.criterion, "diagnostics", None):  # e.g. SparseGPT's damping/retries, MI's clusters
            info["diagnostics"] = dict(self.criterion.diagnostics)
        if report is None:
            report = self.masks.report(self.model, targets=self.targets.weights)
        info["report"] = {"targeted": report.targeted.as_dict(), "model": report.model.as_dict()}
        return PruneResult(masks=self.masks, report=report, info=info)
