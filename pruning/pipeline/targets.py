"""The first stage of every pruning event: what is targeted, read off the model's structure and the options."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    """What ``options`` target in the model ``structure`` describes."""
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
    return Targets(structure, group_sets, weights, modules, parameters, structure.num_parameters())
