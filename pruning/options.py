"""What a pruning run is asked to do, typed once.

- :class:`Granularity`: what one pruned unit is, parsed once from its name (``"2:4"`` becomes ``n=2, m=4`` here and
  nowhere else).
- :class:`SelectionOptions`: what is pruned and how the sparsity is spread over the layers — the options that
  :func:`pruning.prune`, :class:`pruning.callbacks.PruningCallback`, :class:`pruning.callbacks.PruningReport` and the
  rate search share.
- :class:`PruneOptions`: those plus what one event adds: how much (``sparsity``), the loss whose gradients score
  (``alpha``, ``temperature``), the one-shot protocol within a layer.

Every value is checked when the options are built, so a bad one fails before any model is touched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from .importance import Criterion

IGNORE_INDEX = -100  # labels that take no loss (padding, prompts), as in Hugging Face and torch's cross-entropy

JOINT = "mlp_neuron+attention_head"  # MLP neurons and KV groups in one event, under one parameter budget
GranularityName = Literal[
    "unstructured",
    "2:4",
    "4:8",
    "mlp_neuron",
    "attention_head",
    "query_head",
    "layer",
    "expert_neuron",
    "expert",
    "mlp_neuron+attention_head",
]
GRANULARITIES: tuple[str, ...] = get_args(GranularityName)
STRUCTURED = ("mlp_neuron", "attention_head", "query_head", "layer", "expert_neuron", "expert", JOINT)
Allocation = Literal["uniform", "global", "owl", "rates"]
Scope = Literal["row", "layer", "global"]
SparsityBasis = Literal["targets", "model"]


@dataclass(frozen=True)
class Granularity:
    """One pruned unit: a single weight (``unstructured``), ``N`` kept of every ``M`` consecutive input columns
    (``"N:M"``, e.g. ``2:4``), an MLP neuron, a KV group with its query heads (``attention_head``), a query head, a
    whole decoder layer, the neurons inside the routed experts of a mixture of experts (``expert_neuron``), whole
    routed experts (``expert``), or MLP neurons and KV groups together (``mlp_neuron+attention_head``: both group
    kinds selected in one event under one parameter budget, :attr:`kinds`)."""

    name: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, value: str | Granularity) -> Granularity:
        if isinstance(value, Granularity):
            return value
        if isinstance(value, str) and ":" in value:
            try:
                n, m = (int(x) for x in value.split(":"))
            except ValueError:
                raise ValueError(f"granularity={value!r} is not one of {list(GRANULARITIES)} (or N:M)") from None
            if not 0 < n < m:
                raise ValueError(f"granularity={value!r}: N:M needs 0 < N < M")
            return cls(value, n, m)
        if value not in GRANULARITIES:
            raise ValueError(f"granularity={value!r} is not one of {list(GRANULARITIES)}")
        return cls(value)

    @property
    def nm(self) -> tuple[int, int] | None:
        return (self.n, self.m) if self.m else None

    @property
    def kind(self) -> str:
        """What criteria declare support for: ``n:m`` for every N:M pattern, else the name."""
        return "n:m" if self.m else self.name

    @property
    def structured(self) -> bool:
        return self.name in STRUCTURED

    @property
    def kinds(self) -> tuple[str, ...]:
        """The group kinds a structured unit prunes (two for a joint one, whose groups share one budget)."""
        return tuple(self.name.split("+")) if self.structured else ()

    @property
    def joint(self) -> bool:
        return len(self.kinds) > 1

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern prunes exactly (``1 − N/M``); ``None`` for the others."""
        return 1 - self.n / self.m if self.m else None

    def __str__(self) -> str:
        return self.name


def _check_fraction(name: str, value: float, upper: str = ")") -> None:
    ok = 0 <= value < 1 if upper == ")" else 0 <= value <= 1
    if not ok:
        raise ValueError(f"{name}={value} must be in [0, 1{upper}")


@dataclass(frozen=True)
class SelectionOptions:
    """What is pruned and how the sparsity is spread over the layers.

    Args:
        method: a registered criterion (``magnitude``, ``wanda``, ``taylor``, ``gblm``, ``sdm``, ``sparsegpt``,
            ``saap``, ``mutual_info``, ``frequency``, ``reap``, ...).
        granularity: ``unstructured``, ``2:4`` / ``4:8`` (any ``N:M``), ``mlp_neuron``, ``attention_head`` (whole KV
            groups), ``query_head`` (the same count per KV group), ``layer``, ``expert_neuron`` (neurons inside the
            routed experts, one width for every expert of a layer), ``expert`` (whole routed experts: the same number
            in every mixture-of-experts layer with ``uniform``, per layer with ``rates`` / ``global``; criteria
            ``frequency``, ``reap``, ``taylor``, ``sdm``, ``magnitude``), or ``mlp_neuron+attention_head`` (MLP
            neurons and KV groups chosen together, the sparsity being one budget of their parameters: per layer with
            ``uniform`` / ``rates``, over the model with ``global``; for criteria that say so, e.g. ``saap``).
        criterion_options: the criterion's own knobs (e.g. ``{alpha: 100, gradient_norm: l1}`` for gblm).
        allocation: ``uniform`` (the same fraction, and count, in every layer), ``global`` (one ranking across
            layers within ``min_keep`` / ``max_keep``), ``owl`` (outlier-weighted rates) or ``rates`` (given).
        scope: unstructured comparison group: ``row`` (Wanda's), ``layer`` or ``global``; by default the
            criterion's own (``row``; ``layer`` for sparsegpt: one threshold over each column block, the paper's).
        sparsity_basis: ``targets`` (a fraction of the targeted weights) or ``model`` (of all parameters,
            SDMPrune's definition).
        layer_rates: per-layer sparsities for ``allocation: rates``.
        rates_file: instead of ``layer_rates``: the JSON written by ``pruning search`` (Self-Pruner) or ``pruning
            rank`` (SAAP); SAAP's learned ``criterion_options`` come with it for ``method: saap`` (options given
            here win).
        min_keep: lower bound of the kept fraction per layer (``global``).
        max_keep: upper bound of the kept fraction per layer (``global``).
        owl_m: OWL outlier threshold M.
        owl_lambda: OWL rate spread λ.
        include_embeddings: unstructured: also target the input embeddings.
        include_lm_head: unstructured: also target the LM head.
    """

    method: str = "wanda"
    granularity: GranularityName | str = "unstructured"
    criterion_options: dict = field(default_factory=dict)
    allocation: Allocation = "uniform"
    scope: Scope | None = None
    sparsity_basis: SparsityBasis = "targets"
    layer_rates: list[float] | None = None
    rates_file: str | None = None
    min_keep: float = 0.0
    max_keep: float = 1.0
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    include_embeddings: bool = False
    include_lm_head: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "criterion_options", dict(self.criterion_options or {}))
        if self.layer_rates is not None:
            object.__setattr__(self, "layer_rates", [float(r) for r in self.layer_rates])
        unit = self.unit
        criterion = self.criterion()  # unknown method or option: a clear error now
        criterion.check_granularity(str(unit))
        self._check_allocation(unit)
        if criterion.needs_activations and (self.include_embeddings or self.include_lm_head):
            raise ValueError(
                f"method={self.method!r} needs Linear inputs: embeddings/lm_head can only be targeted by gradient "
                "or magnitude criteria"
            )
        if not criterion.global_ranking and (self.allocation == "global" or self.scope == "global"):
            raise ValueError(
                f"method={self.method!r} scores each layer on its own terms (per-layer reconstruction or ranks): "
                "there is no global ranking. HINT: use allocation='uniform', 'owl' or 'rates'"
                + (", scope='row' or 'layer'" if not unit.structured else "")
            )

    def _check_allocation(self, unit: Granularity) -> None:
        if self.allocation not in ("uniform", "global", "owl", "rates"):
            raise ValueError(f"allocation={self.allocation!r} must be 'uniform', 'global', 'owl' or 'rates'")
        if self.scope not in (None, "row", "layer", "global"):
            raise ValueError(f"scope={self.scope!r} must be 'row', 'layer' or 'global'")
        if self.sparsity_basis not in ("targets", "model"):
            raise ValueError(f"sparsity_basis={self.sparsity_basis!r} must be 'targets' or 'model'")
        if self.layer_rates is not None and self.rates_file is not None:
            raise ValueError("give layer_rates or rates_file, not both")
        if self.rates_file is not None and self.allocation != "rates":
            raise ValueError(f"rates_file is given but allocation={self.allocation!r}. HINT: set allocation: rates")
        if self.allocation == "rates" and self.layer_rates is None and self.rates_file is None:
            raise ValueError(
                "allocation='rates' needs layer_rates=[...] (one sparsity per decoder layer) or rates_file"
            )
        if unit.nm is not None and self.allocation != "uniform":
            raise ValueError(f"granularity={unit.name!r} fixes the pattern of every row: use allocation='uniform'")
        if unit.name == "expert" and self.allocation == "owl":
            raise ValueError(
                "allocation='owl' reads outlier ratios of per-weight scores, which whole-expert criteria do not have. "
                "HINT: for granularity='expert' use allocation='uniform' (the same count in every layer: a stock "
                "config), 'rates' or 'global' (a per-layer export)"
            )
        _check_fraction("min_keep", self.min_keep, "]")
        _check_fraction("max_keep", self.max_keep, "]")
        if unit.joint and (self.min_keep, self.max_keep) != (0.0, 1.0):
            raise ValueError(
                f"granularity={unit.name!r} shares one parameter budget between two kinds of groups, which "
                "min_keep / max_keep (a kept fraction of one kind) do not bound. HINT: leave min_keep and max_keep "
                "at their defaults (every kind keeps at least one group per layer)"
            )

    # ---------------------------------------------------------------------------------------------- derived
    @property
    def unit(self) -> Granularity:
        return Granularity.parse(self.granularity)

    @property
    def comparison_scope(self) -> str | None:
        """The unstructured comparison group (the criterion's ``default_scope`` unless set: ``row``, SparseGPT's
        ``layer``); ``None`` for structured granularities."""
        from .importance import CRITERIA

        return self.scope or (CRITERIA[self.method].default_scope if not self.unit.structured else None)

    def criterion(self) -> Criterion:
        """A fresh instance of the criterion with its options (criteria may keep diagnostics of one run)."""
        from .importance import get_criterion

        return get_criterion(self.method, **self.criterion_options)

    @property
    def ranks_across_layers(self) -> bool:
        """Whether selection compares scores of different layers (global ranking, whole layers)."""
        unit = self.unit
        return (
            unit.name == "layer"
            or (unit.structured and self.allocation == "global")
            or (not unit.structured and (self.allocation == "global" or self.comparison_scope == "global"))
        )

    @property
    def scores_layers_alone(self) -> bool:
        """Whether each decoder layer's weights are read on their own at an event (``uniform`` or ``rates``
        allocation, no ranking across layers, no weight rewriting): a caller may then hold one layer's full weights
        at a time (FSDP2 unsharding one layer per scope)."""
        return (
            self.allocation in ("uniform", "rates")
            and not self.ranks_across_layers
            and not self.criterion().reconstructs
        )

    def with_rates(self, layer_rates: list[float], criterion_options: dict | None = None) -> SelectionOptions:
        """These options with ``layer_rates`` in place of ``rates_file`` (and ``criterion_options`` read with them
        underneath the ones given here)."""
        return dataclasses.replace(
            self,
            layer_rates=list(layer_rates),
            rates_file=None,
            criterion_options={**(criterion_options or {}), **self.criterion_options},
        )

    def record(self) -> dict:
        """What a result records about the selection (every field, the granularity by name)."""
        out = dataclasses.asdict(self)
        out["granularity"] = str(self.unit)
        out["scope"] = self.comparison_scope
        return out


@dataclass(frozen=True)
class PruneOptions(SelectionOptions):
    """:class:`SelectionOptions` plus what one pruning event adds.

    Args:
        sparsity: fraction pruned, of the targeted weights or of all parameters (``sparsity_basis``).
        alpha: the scoring loss of gradient criteria that distill (``sdm``): ``(1−α)·CE + α·KL(teacher ‖ student)``,
            the teacher being the model with the masks lifted.
        temperature: τ of that loss, dividing the teacher's logits.
        kl_positions: the KL averaged over the CE's labelled next-token positions (``labelled``, default) or over
            every position (``all``: SDMPrune's code, ``KL / seq_len``); see :func:`pruning.losses.distillation_loss`.
        sequential: one-shot, activation criteria: the calibration data runs one decoder layer at a time through the
            already-pruned layers (the papers' protocol), or through the dense model at once (``False``).
        within_layer: one-shot, unstructured / N:M, layer by layer: ``dense`` (every Linear of a layer scored on
            the dense layer's activations; Wanda's and SparseGPT's default) or ``sequential`` (each Linear pruned
            on the inputs it receives from the already-pruned Linears before it; SparseGPT's "true sequential").
        monotone: a pruned weight stays pruned when masks are recomputed.
    """

    sparsity: float = 0.5
    alpha: float = 0.0
    temperature: float = 1.0
    kl_positions: Literal["labelled", "all"] = "labelled"
    sequential: bool = True
    within_layer: Literal["dense", "sequential"] = "dense"
    monotone: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        unit = self.unit
        if unit.nm is not None and not math.isclose(self.sparsity, unit.fixed_sparsity):
            raise ValueError(
                f"sparsity={self.sparsity} contradicts granularity={unit.name!r}, which prunes exactly "
                f"{unit.fixed_sparsity:g}. HINT: pass sparsity={unit.fixed_sparsity:g} or leave the default."
            )
        _check_fraction("sparsity", self.sparsity)
        if self.within_layer not in ("dense", "sequential"):
            raise ValueError(f"within_layer={self.within_layer!r} must be 'dense' or 'sequential'")
        if self.kl_positions not in ("labelled", "all"):
            raise ValueError(f"kl_positions={self.kl_positions!r} must be 'labelled' or 'all'")
        if self.within_layer == "sequential" and (unit.structured or self.allocation in ("global", "owl")):
            raise ValueError(
                "within_layer='sequential' prunes each Linear on its own as the layer runs: it supports unstructured "
                f"and N:M granularities with allocation 'uniform' or 'rates', not granularity={unit.name!r}, "
                f"allocation={self.allocation!r}. HINT: use within_layer='dense'"
            )
        criterion = self.criterion()
        if self.alpha != 0 and not criterion.distills:
            from .importance import CRITERIA

            distilling = " / ".join(f"method={n!r}" for n, c in sorted(CRITERIA.items()) if c.distills)
            raise ValueError(
                f"alpha={self.alpha} is the distillation weight of {distilling}; {self.method!r} scores with CE"
            )
        _check_fraction("alpha", self.alpha, "]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")

    @classmethod
    def of(cls, selection: SelectionOptions, **event: object) -> PruneOptions:
        """The options of one event: ``selection`` plus the event's fields (``sparsity``, ``alpha``, ...)."""
        fields = {f.name: getattr(selection, f.name) for f in dataclasses.fields(SelectionOptions)}
        return cls(**fields, **event)

    def record(self) -> dict:
        out = super().record()
        if not self.criterion().distills:
            out.pop("alpha")
            out.pop("temperature")
        return out
