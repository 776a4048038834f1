"""The first stage of every pruning event: what is targeted, read off the model's structure and the options."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..masks import MaskSet
from ..options import SelectionOptions
from ..structure import GroupSet, ModelStructure


@dataclass
class Targets:
    """The weights one event considers.

    ``group_sets``: one per decoder layer for structured granularities (empty for unstructured / N:M; a joint
    granularity has one per kind and layer, layer by layer: the layer's MLP neurons, then its KV groups);
    ``weights``: the parameter names that are scored (the groups' members, or the unstructured targets);
    ``modules``: the modules whose inputs activation statistics are taken of, by name;
    ``parameters``: how many parameters the targeted weights hold; ``total``: how many the model holds.
    """

    structure: ModelStructure
    group_sets: list[GroupSet]
    weights: list[str]
    modules: dict[str, nn.Module]
    parameters: int
    total: int

    def weights_in(self, layer: int | None) -> list[str]:
        """The targeted weights of decoder layer ``layer`` (``None``: those outside every layer)."""
        return [n for n in self.weights if self.structure.layer_of(n) == layer]

    def sets_in(self, layer: int) -> list[GroupSet]:
        """The group sets of decoder layer ``layer`` (one, or one per kind of a joint granularity)."""
        return [gs for gs in self.group_sets if gs.layer == layer]

    def modules_in(self, layer: int) -> dict[str, nn.Module]:
        return {n: m for n, m in self.modules.items() if self.structure.layer_of(n) == layer}

    def fraction(self, sparsity: float, basis: str) -> float:
        """``sparsity`` as a fraction of the targeted weights (``basis='model'``: it was one of all parameters)."""
        if basis != "model":
            return sparsity
        frac = sparsity * self.total / self.parameters
        if frac >= 1:
            raise ValueError(
                f"sparsity={sparsity} of all {self.total} parameters exceeds the {self.parameters} targeted ones. "
                "HINT: lower sparsity or use sparsity_basis='targets'"
            )
        return frac


def plan_targets(structure: ModelStructure, options: SelectionOptions) -> Targets:
    """What ``options`` target in the model ``structure`` describes (an N:M pattern checked against every targeted
    weight's input width now, not at the event)."""
    model = structure.model
    unit = options.unit
    if unit.structured:
        per_kind = [structure.group_sets(kind) for kind in unit.kinds]  # type: ignore[arg-type]
        group_sets = [gs for layer in zip(*per_kind) for gs in layer]
        weights = sorted({m.name for gs in group_sets for m in gs.members})
        parameters = sum(sum(gs.numels) for gs in group_sets)
        owners = dict.fromkeys(m.name.rsplit(".", 1)[0] for gs in group_sets for m in gs.members)
        modules = {n: model.get_submodule(n) for n in owners}
    else:
        group_sets = []
        modules = structure.targets(options.include_embeddings, options.include_lm_head)
        weights = [n + ".weight" for n in modules]
        parameters = sum(model.get_parameter(n).numel() for n in weights)
    if unit.nm is not None:
        for name in weights:
            width = model.get_parameter(name).shape[-1]
            if width % unit.m:
                raise ValueError(
                    f"granularity={unit.name!r} groups every {unit.m} consecutive input columns, but {name} has "
                    f"{width} (not a multiple of {unit.m}). HINT: use unstructured pruning, or an N:M whose M divides "
                    "every width"
                )
    return Targets(structure, group_sets, weights, modules, parameters, structure.num_parameters())


ZERO_SHARE = 0.01  # a weight whose exact zeros exceed this share was pruned before (natural zeros are far rarer)


@torch.no_grad()
def existing_zeros(model: nn.Module, targets: Targets) -> MaskSet:
    """Masks of what an earlier pruning left in the targeted weights: groups whose weights are all exactly zero, or
    (unstructured / N:M) the zeros of a weight more than 1 % zero.

    FIX: pruning a model twice without passing the first call's ``masks=`` reported the second call's sparsity only,
    and ``attach`` of its masks then let the first call's zeros revive in training (3,968 of 9,216 in the repro).
    Continuing from the zeros makes the second call monotone, as with the masks passed."""
    masks = MaskSet()
    params = dict(model.named_parameters(remove_duplicate=False))
    if targets.group_sets:
        for gs in targets.group_sets:
            alive = torch.zeros(gs.count, dtype=torch.bool)
            for m in gs.members:
                w = params[m.name].detach()
                alive |= m.per_group(w, gs.count).ne(0).any(1).cpu()
            if not bool(alive.all()):
                masks.set_groups(gs, alive)
        return masks
    for name in targets.weights:
        w = params[name].detach()
        zero = w.eq(0)
        if float(zero.float().mean()) > ZERO_SHARE:
            masks.set_element(name, ~zero)
    return masks
