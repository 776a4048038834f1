"""How much the masks prune: per tensor, per decoder layer, per granularity, of the targeted weights and the model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..structure import ModelStructure, UnsupportedModelError
from .storage import KeepMasks


@dataclass
class Counts:
    pruned: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.pruned / self.total if self.total else 0.0

    def add(self, pruned: int, total: int) -> None:
        self.pruned += pruned
        self.total += total

    def as_dict(self) -> dict:
        return {"pruned": self.pruned, "total": self.total, "fraction": self.fraction}


@dataclass
class SparsityReport:
    """Pruned counts per tensor, per decoder layer, per granularity, of the targeted weights and of the model.

    ``targeted`` counts the weights the pruning was asked to consider; ``model`` counts all parameters (the
    definition SDMPrune uses when it says "20 % pruned"). Granularity counts are *groups* (neurons, heads, layers);
    ``element`` counts weights masked element-wise.
    """

    tensors: dict[str, Counts] = field(default_factory=dict)
    layers: dict[int, Counts] = field(default_factory=dict)
    granularity: dict[str, Counts] = field(default_factory=dict)
    targeted: Counts = field(default_factory=Counts)
    model: Counts = field(default_factory=Counts)

    def as_dict(self) -> dict:
        return {
            "tensors": {k: v.as_dict() for k, v in self.tensors.items()},
            "layers": {k: v.as_dict() for k, v in self.layers.items()},
            "granularity": {k: v.as_dict() for k, v in self.granularity.items()},
            "targeted": self.targeted.as_dict(),
            "model": self.model.as_dict(),
        }

    def format(self) -> str:
        lines = ["| scope | pruned | total | fraction |", "|---|---:|---:|---:|"]
        for k, c in self.granularity.items():
            lines.append(f"| {k} (groups) | {c.pruned} | {c.total} | {c.fraction:.4f} |")
        for i, c in sorted(self.layers.items()):
            lines.append(f"| layer {i} | {c.pruned} | {c.total} | {c.fraction:.4f} |")
        lines.append(
            f"| targeted weights | {self.targeted.pruned} | {self.targeted.total} | {self.targeted.fraction:.4f} |"
        )
        lines.append(f"| all parameters | {self.model.pruned} | {self.model.total} | {self.model.fraction:.4f} |")
        return "\n".join(lines)


class Reporting(KeepMasks):
    """Keep masks that report their sparsity on a model."""

    def report(self, model: nn.Module, targets: Iterable[str] | None = None) -> SparsityReport:
        """Sparsity of the masks (entries masked out, not natural zeros). ``targets``: the parameter names the
        pruning considered (default: the masked parameters). Collective when element masks are held as rows."""
        try:
            structure: ModelStructure | None = ModelStructure(model)
        except (UnsupportedModelError, AttributeError):
            structure = None
        target_names = set(targets) if targets is not None else set()
        target_names |= self.names()
        rep = SparsityReport()
        masked = self.names()
        for name, p in model.named_parameters():
            name = name.replace(".base_layer.", ".")  # PEFT-wrapped weights report under their own names
            pruned = 0
            if name in masked:
                pruned = self.pruned_count(name, p)
            rep.model.add(pruned, p.numel())
            if name in target_names:
                rep.targeted.add(pruned, p.numel())
                rep.tensors[name] = Counts(pruned, p.numel())
                layer = structure.layer_of(name) if structure else None
                if layer is not None:
                    rep.layers.setdefault(layer, Counts()).add(pruned, p.numel())
        if self.element:
            rep.granularity.setdefault("element", Counts()).add(*self._element_counts())
        for key, keep in self.groups.items():
            kind = self.group_sets[key].kind
            rep.granularity.setdefault(kind, Counts()).add(int((~keep).sum()), keep.numel())
        return rep
