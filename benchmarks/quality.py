"""Quality benchmark: every criterion at equal sparsity on a model that has learned something, before and after a
fixed short recovery.

The model is the reference model (:mod:`benchmarks.reference_model`: a Llama with GQA trained on the standard
library's source, BPE tokenizer trained on the train split, cached). For every setting — 50 % unstructured, 2:4,
4:8, 20 / 30 / 50 % of the MLP neurons (uniform width) and 25 % of the KV groups — every criterion that supports
the granularity prunes a fresh copy of the dense model; cells a criterion does not support are "–".

- **Calibration**: the same seeded windows of the train stream for every method (``--calibration`` sequences of
  the model's ``seq_len``); their sha256 (:func:`pruning.calibration_fingerprint`) is recorded and checked against
  what every ``prune`` call saw.
- **Each criterion's default form**, with its other form as an extra row where they differ: ``magnitude`` (L2 norm
  of a group's coupled weights) and ``magnitude (L1)``; ``wanda`` (Wanda-sp: a group's down_proj / o_proj columns
  with their input norms) and ``wanda (sum)`` (every coupled weight); ``sparsegpt`` (the paper's selection, one
  threshold per column block across the rows) and ``sparsegpt (per row)``. The forms differ only in group scores
  (structured settings) or in the unstructured comparison group, so the extra rows run only there.
- **GBLM** runs twice: with the project's default α=100 on raw norms, and with the authors' weighting (their code
  averages the activation term over the N samples and scales gradients by 100, i.e. α = 100·√N here).
- **Gradients**: criteria that score with gradients of the *dense* model's cross-entropy (taylor, gblm, SDM's
  stage A, saap) share one pass over the calibration set (one backward per sequence, every statistic they need
  collected at once), which is exactly what each ``prune`` call would compute alone. SDM's stage B (KL + CE against
  the lifted original, α=0.42, t=0.5: the paper's 30 % row, used at every sparsity) collects its own on the
  stage-A-pruned model. SAAP's σ is learned once per granularity (:func:`pruning.allocation.ranking.saap_scores`).
- **Non-uniform rows** (per-layer rates with the same mean, so the same parameter count): ``wanda + OWL``,
  ``saap + ranking`` (SAAP's importance-fluctuation ranking of the layers,
  :func:`pruning.allocation.ranking.saap_layer_rates`)
  and ``self-pruner (classical)`` (Self-Pruner's evolutionary search of the layer rates with Wanda's group scores,
  :func:`pruning.allocation.search.search_rates`, scaled down to ``--search-population`` ×
  ``--search-generations``; fitness is
  the perplexity on ``--search-windows`` seeded windows of the *train* stream, never the held-out files);
  ``self-pruner (LLM operators)``: the same search with the paper's four operators (initialisation, parent
  selection, crossover, mutation) asked of an operator model (``--operator-model``: by default the demo model
  fine-tuned on operator prompts, :mod:`benchmarks.operator_model`; ``scripted`` for a scripted stand-in), each
  unusable answer replaced by the classical operator and counted.
- **Heads and neurons together**: ``saap (joint)`` prunes MLP neurons and KV groups in one event
  (``granularity='mlp_neuron+attention_head'``) with a per-layer budget of exactly the parameters the column's
  uniform setting removes (so the same parameter count), SAAP's σ learned on the joint normalisation.
- **Mutual information, both procedures**: ``mutual_info (clustered)`` (the scalable greedy mode) and
  ``mutual_info (random pairs)`` (the paper's own: random pairs, a threshold, the KL-chosen seed;
  ``MI_RANDOM_PAIRS`` gives its threshold, chosen so that every layer can reach 50 %).
- **Identical masks**: the sha256 of every pruned model's zero pattern is recorded; methods that pruned exactly the
  same weights are listed (with only 4 KV groups per layer, several criteria make the same choice).
- **Held-out perplexity**: ``--eval-windows`` non-overlapping windows of ``seq_len`` tokens evenly spaced over the
  held-out split (files never seen in training), the same windows for every row.
- **Recovery**: the same token budget, batches and order for every method (``--recovery-steps`` × ``--recovery-batch``
  sequences of the train stream, seeded and hashed), AdamW at a constant ``--recovery-lr`` (no weight decay), masks held
  (``MaskSet.attach``), through :func:`pruning.training.train`. The default LR is a quarter of the LR the reference
  model's training ended with (5e-5 for ``cpu``): at the final LR itself, with or without warm-up, a fresh AdamW made
  the *dense* model worse on held-out files in these few steps (checked once on a shorter-trained model, dense and
  magnitude only; not tuned per method). The dense model gets the same recovery as a control: the reference model is
  under-trained, so part of any gain is plain extra training.

Outputs (``--out``, default ``docs/``): ``quality.md`` (tables, head-to-head comparisons, protocol, timings),
``quality.json`` (everything), ``quality_table.md`` (the README's copy), ``quality_unstructured.png`` and
``quality_mlp.png`` (perplexity against sparsity, one line per method, before and after recovery).

    .venv/bin/python benchmarks/quality.py                 # loads (or trains) the cpu reference model; ~15 min on
                                                           # 2 quiet cores (50 min measured on cores shared with tests)
    .venv/bin/python benchmarks/quality.py --from-json docs/quality.json   # only redraw the tables and plots
    .venv/bin/python benchmarks/quality.py --methods wanda,gblm --settings unstructured50,mlp30
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_model as refm  # noqa: E402

from pruning import allocation as alloc  # noqa: E402
from pruning import calibration_fingerprint, get_criterion, prune  # noqa: E402
from pruning.allocation.operators import LLMOperator  # noqa: E402
from pruning.allocation.ranking import (
    saap_layer_rates,  # noqa: E402
    saap_scores,  # noqa: E402
)
from pruning.allocation.search import search_rates  # noqa: E402
from pruning.options import JOINT  # noqa: E402
from pruning.pipeline import collect_gradients  # noqa: E402
from pruning.stats import GradientCollector  # noqa: E402
from pruning.structure import ModelStructure  # noqa: E402
from pruning.text.stdlib import batches as split_batches  # noqa: E402
from pruning.text.stdlib import windows  # noqa: E402
from pruning.training import TrainConfig, train  # noqa: E402

# GBLM's authors average the activation term over the N samples and scale gradients by 100: against our raw norms
# their weighting is α = 100·√N (see pruning/importance/gblm.py); the project's default is α = 100.
AUTHORS_GBLM_ALPHA = "100*sqrt(N)"
SDM_STAGE_A = 0.025  # SDMPrune: stage A prunes lightly with CE scores
SDM_ALPHA, SDM_TEMPERATURE = 0.42, 0.5  # stage B: the paper's 30 % row
# Self-Pruner's search, scaled down from the paper's 30 × 20 generations (10 mutations, 10 crossovers) to fit a CPU
# run: ~60 candidates per setting, each one held-out pass over the fitness split
DEFAULT_SEARCH = {"population": 10, "generations": 5, "mutations": 5, "crossovers": 5}
# the MI paper's procedure: ρ above the threshold makes a pair redundant. On the cpu reference model (256 sampled
# tokens) ρ's 90th percentile over all pairs of a layer is 0.15-0.20; 0.2 is the highest of 0.12/0.15/0.18/0.2/0.22
# at which every layer can lose more than half its neurons (720-922 of 1024; at 0.25 only 226-719): the target,
# not the threshold, then decides. 5 seeds, the KL-closest kept. What each layer could lose is reported per cell.
MI_RANDOM_PAIRS = {"mode": "random_pairs", "threshold": 0.2, "seeds": 5}


@dataclass(frozen=True)
class Setting:
    key: str  # CLI name
    label: str  # table column
    granularity: str
    sparsity: float
    plot: str  # which plot: "unstructured" (x: pattern) or "mlp" (x: fraction of neurons); "" for none


SETTINGS: list[Setting] = [
    Setting("unstructured50", "50% unstr.", "unstructured", 0.5, "unstructured"),
    Setting("4:8", "4:8", "4:8", 0.5, "unstructured"),
    Setting("2:4", "2:4", "2:4", 0.5, "unstructured"),
    Setting("mlp20", "MLP 20%", "mlp_neuron", 0.2, "mlp"),
    Setting("mlp30", "MLP 30%", "mlp_neuron", 0.3, "mlp"),
    Setting("mlp50", "MLP 50%", "mlp_neuron", 0.5, "mlp"),
    Setting("kv25", "KV groups 25%", "attention_head", 0.25, ""),
]


@dataclass(frozen=True)
class Method:
    label: str
    criterion: str
    options: dict = field(default_factory=dict)
    # uniform | owl | saap-ranking (SAAP's layer ranking) | search (Self-Pruner) | search-llm (its LLM operators) |
    # joint (MLP neurons and KV groups under the setting's parameter budget)
    allocation: str = "uniform"
    only: tuple[str, ...] | None = None  # granularities it runs at (default: all its criterion supports)
    scope: str | None = None  # unstructured comparison group (default: the criterion's own)
    form_of: str | None = None  # the default row this row is another form of (drawn dotted in that row's colour)

    def resolved_options(self, calibration: int) -> dict:
        """The options with ``"100*sqrt(N)"`` replaced by its value for ``N`` calibration sequences."""
        return {k: (100.0 * math.sqrt(calibration) if v == AUTHORS_GBLM_ALPHA else v) for k, v in self.options.items()}

    def supports(self, granularity: str) -> bool:
        crit = get_criterion(self.criterion, **self.resolved_options(1))
        gran = "n:m" if ":" in granularity and granularity not in crit.granularities else granularity
        if gran not in crit.granularities:
            return False
        return self.only is None or granularity in self.only


STRUCTURED_SETTINGS = ("mlp_neuron", "attention_head")
# the criteria's defaults (magnitude: L2 norm of a group, wanda: Wanda-sp, sparsegpt: block-wide selection), each with
# its other form as an extra row where the forms differ (group scores; unstructured selection)
METHODS: list[Method] = [
    Method("magnitude", "magnitude"),
    Method("magnitude (L1)", "magnitude", {"norm": "l1"}, only=STRUCTURED_SETTINGS, form_of="magnitude"),
    Method("wanda", "wanda"),
    Method("wanda (sum)", "wanda", {"structured": "sum"}, only=STRUCTURED_SETTINGS, form_of="wanda"),
    Method("wanda + OWL", "wanda", allocation="owl", only=("unstructured",)),
    Method("sparsegpt", "sparsegpt"),
    Method("sparsegpt (per row)", "sparsegpt", scope="row", only=("unstructured",), form_of="sparsegpt"),
    Method("gblm", "gblm"),
    Method("gblm (authors' α)", "gblm", {"alpha": AUTHORS_GBLM_ALPHA}),
    Method("taylor", "taylor", {"mode": "element"}),
    Method("taylor (vector)", "taylor", {"mode": "vector"}, only=("mlp_neuron", "attention_head")),
    Method("sdm", "sdm"),
    Method("saap", "saap"),
    Method("saap + ranking", "saap", allocation="saap-ranking", only=("mlp_neuron", "attention_head")),
    Method("mutual_info (clustered)", "mutual_info", only=("mlp_neuron",)),
    Method("mutual_info (random pairs)", "mutual_info", MI_RANDOM_PAIRS, only=("mlp_neuron",)),
    Method("saap (joint)", "saap", allocation="joint", only=("mlp_neuron", "attention_head")),
    Method("self-pruner (classical)", "wanda", allocation="search", only=("mlp_neuron", "attention_head")),
    Method("self-pruner (LLM operators)", "wanda", allocation="search-llm", only=("mlp_neuron", "attention_head")),
]
RENAMED = {"mutual_info": "mutual_info (clustered)", "self-pruner (wanda)": "self-pruner (classical)"}  # old labels


@dataclass
class Shared:
    """What the cells of a run share: dense-model gradients, SAAP's estimates, the search's fitness split."""

    gradients: GradientCollector | None = None
    saap_options: dict = field(default_factory=dict)
    saap_estimates: dict = field(default_factory=dict)
    search_heldout: list = field(default_factory=list)
    search: dict = field(default_factory=dict)  # population, generations, mutations, crossovers
    seed: int = 0
    operator: LLMOperator | None = None  # Self-Pruner's operator model


GRAD_KINDS = ("sum", "sum_sq", "sum_abs", "sum_abs_gw")
GROUP_KINDS = ("coupled", "vector")


# ---------------------------------------------------------------------------------------------- pieces
def nonzero_params(model: torch.nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def tensor_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def zeros_sha256(model: torch.nn.Module) -> str:
    """Fingerprint of where the model's zeros are: two methods with the same value pruned the same weights."""
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        h.update((p.detach() == 0).contiguous().numpy().tobytes())
    return h.hexdigest()


def shared_gradients(model, calib: list[torch.Tensor], granularities: set[str]) -> GradientCollector:
    """Dense-model CE gradient statistics for every gradient criterion at once (one backward per sequence)."""
    structure = ModelStructure(model)
    group_sets = [
        gs for g in sorted(granularities & {"mlp_neuron", "attention_head"}) for gs in structure.group_sets(g)
    ]
    names = [n + ".weight" for n in structure.targets(False, False)]
    coll = GradientCollector(
        model, param_names=names, grad_kinds=GRAD_KINDS, group_sets=group_sets, group_kinds=GROUP_KINDS
    )
    collect_gradients(model, calib, coll, progress=False)
    coll.reduce()
    return coll


def apply_method(model, method: Method, setting: Setting, calib, shared: Shared) -> tuple:
    """Prune ``model`` in place with ``method`` at ``setting``: ``(last pruning.PruneResult, extra row fields)``.

    ``saap-ranking`` takes SAAP's non-uniform layer rates from the fluctuation of its per-batch scores;
    ``search`` runs Self-Pruner's evolutionary search of layer rates for the criterion (fitness: perplexity on a
    split of the train stream, never the held-out text), then prunes with the best rates it found.
    """
    gran, s = setting.granularity, setting.sparsity
    n_calib = sum(c.shape[0] for c in calib)
    if method.criterion == "sdm":
        a = prune(
            model, calib, "sdm", SDM_STAGE_A, gran, keep_original=True, gradients=shared.gradients, progress=False
        )
        return prune(
            model,
            calib,
            "sdm",
            s,
            gran,
            masks=a.masks,
            alpha=SDM_ALPHA,
            temperature=SDM_TEMPERATURE,
            keep_original=True,
            progress=False,
        ), {}
    opts = method.resolved_options(n_calib)
    if method.allocation == "joint":
        return joint_cell(model, setting, calib, shared)
    if method.criterion == "saap":
        opts.update(shared.saap_options[gran])
    grads = shared.gradients if get_criterion(method.criterion, **opts).needs_gradients else None
    extra: dict = {}
    allocation, rates = method.allocation, None
    if allocation in ("saap-ranking", "search", "search-llm"):
        # the mean rate that uniform width reaches (whole groups, rounded down in every layer): the same number of
        # groups pruned as the uniform rows, so the parameter counts are equal
        group_sets = ModelStructure(model).group_sets(gran)
        s = sum(
            (gs.count - alloc.keep_counts_uniform([gs.count], s, gs.partitions)[0]) / gs.count for gs in group_sets
        ) / len(group_sets)
    if allocation == "saap-ranking":
        rates, indicator = saap_layer_rates(shared.saap_estimates[gran], s)
        extra = {"layer_rates": rates, "fluctuation": indicator}
    elif allocation in ("search", "search-llm"):
        t = time.time()
        found = search_rates(
            model,
            calib,
            shared.search_heldout,
            s,
            method.criterion,
            gran,
            criterion_options=opts,
            seed=shared.seed,
            progress=False,
            operator_model=shared.operator if allocation == "search-llm" else None,
            **shared.search,
        )
        rates = found.rates
        extra = {
            "layer_rates": rates,
            "search_fitness": found.fitness,
            "search_uniform_fitness": found.uniform_fitness,
            "search_evaluations": len(found.history.get("evaluated", [])),
            "search_s": time.time() - t,
        }
        if allocation == "search-llm":
            extra["search_llm"] = found.history["stats"].get("llm", {})
            extra["search_llm_origins"] = [c["origin"] for c in found.history["generations"][-1]["population"]]
    if rates is not None:
        allocation = "rates"
    result = prune(
        model,
        calib,
        method.criterion,
        s,
        gran,
        allocation=allocation,
        scope=method.scope,
        layer_rates=rates,
        criterion_options=opts,
        gradients=grads,
        progress=False,
    )
    if opts.get("mode") == "random_pairs":  # MI's paper procedure: what each layer could remove, the seed it kept
        diag = result.info["diagnostics"]
        extra["mi_removable"] = {k: d["removed_per_seed"][d["chosen_seed"]] for k, d in sorted(diag.items())}
        extra["mi_chosen_seed"] = {k: d["chosen_seed"] for k, d in sorted(diag.items())}
    return result, extra


def joint_cell(model, setting: Setting, calib, shared: Shared) -> tuple:
    """``saap (joint)``: MLP neurons and KV groups of every layer under one budget, the parameters the setting's
    uniform pruning removes in that layer (so the same parameter count as the column's other rows)."""
    structure = ModelStructure(model)
    unit = structure.group_sets(setting.granularity)[0]  # every layer is the same
    removed = (unit.count - alloc.keep_counts_uniform([unit.count], setting.sparsity, unit.partitions)[0]) * (
        unit.params_per_group
    )
    targeted = sum(sum(gs.numels) for k in ("mlp_neuron", "attention_head") for gs in structure.group_sets(k)[:1])
    fraction = (removed + 0.5) / targeted  # the budget is floor(fraction · targeted) = removed
    result = prune(
        model,
        calib,
        "saap",
        fraction,
        JOINT,
        criterion_options=shared.saap_options[JOINT],
        gradients=shared.gradients,
        progress=False,
    )
    kept = result.info["kept_groups_per_layer"]
    extra = {
        "joint_fraction": fraction,
        "joint_removed_per_layer": removed,
        "joint_kept": {k: v for k, v in sorted(kept.items())},
    }
    return result, extra


def recover(model, masks, batches: torch.Tensor, lr: float) -> list[float]:
    """A plain AdamW run over ``batches`` ``[steps, batch, seq]`` (constant ``lr``, no weight decay, clipping 1.0)
    with the masks held; returns the losses and leaves the model in eval mode."""
    config = TrainConfig(steps=batches.shape[0], lr=lr, betas=(0.9, 0.95), weight_decay=0.0, clip_grad_norm=1.0)
    losses = train(model, batches, config, masks=masks)
    model.eval()
    return losses


class ScriptedOperator:
    """A scripted operator 'model' (the stand-in when no model is built): it answers every prompt as the classical
    operators would, reading the population, parents and counts from the prompt (``--operator-model scripted``)."""

    name = "scripted (classical answers)"

    def __init__(self, seed: int = 0) -> None:
        import random

        self.rng = random.Random(seed)

    def generate(self, prompt: str) -> str:
        from pruning.allocation.operators import parse_rate_lists

        lines = prompt.splitlines()
        task = lines[-1]
        n = int(prompt.split("A model with ")[1].split(" ")[0])
        target = float(prompt.split("must be ")[1].split(" ")[0])
        if "initial population" in prompt:
            count = int(task.split("Answer with ")[1].split(" ")[0])
            rows = [[target + 0.1 * self.rng.gauss(0.0, 1.0) for _ in range(n)] for _ in range(count)]
            return "\n".join(_rates(r) for r in rows)
        if "Select" in task:
            size = int(prompt.split("best first (")[1].split(" ")[0])
            picks: list[int] = []
            for _ in range(2 if "two parents" in task else 1):  # tournaments of 3 among those not yet picked
                rest = [i for i in range(size) if i not in picks]
                picks.append(min(self.rng.sample(rest, min(3, len(rest)))))
            return "[" + ", ".join(map(str, picks)) + "]"
        parents = parse_rate_lists(lines[-2], n)[0]
        if len(parents) == 2:
            return _rates([parents[self.rng.random() < 0.5][i] for i in range(n)])
        child = list(parents[0])
        for i in self.rng.sample(range(n), max(1, n // 2)):
            child[i] = min(max(child[i] + 0.05 * self.rng.gauss(0.0, 1.0), 0.0), 0.899)
        return _rates(child)


def _rates(rates) -> str:
    return "[" + ", ".join(f"{min(max(r, 0.0), 0.899):.3f}" for r in rates) + "]"


def operator_for(spec: str | None, seed: int) -> tuple[LLMOperator, dict]:
    """Self-Pruner's operator: ``scripted``, a local model path, or (default) the demo model fine-tuned on operator
    prompts (:mod:`benchmarks.operator_model`, built and cached on first use)."""
    if spec == "scripted":
        return LLMOperator(ScriptedOperator(seed)), {"model": ScriptedOperator.name}
    if spec is None:
        import operator_model

        path = operator_model.load_or_build()
        info = json.loads((path / "operator_manifest.json").read_text())
        return LLMOperator(str(path), max_new_tokens=448, seed=seed), {"model": str(path), **info}
    return LLMOperator(spec, max_new_tokens=448, seed=seed), {"model": spec}


# ---------------------------------------------------------------------------------------------- the run
def run(
    ref: refm.Reference,
    *,
    settings: list[Setting] = SETTINGS,
    methods: list[Method] = METHODS,
    calibration: int = 64,
    calib_batch: int = 8,
    eval_windows: int = 64,
    recovery_steps: int = 16,
    recovery_batch: int = 8,
    recovery_lr: float | None = None,
    seed: int = 0,
    search_windows: int = 16,
    search: dict | None = None,
    operator: str | None = None,
    out: Path | None = Path("docs"),
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    t_start = time.time()
    times: dict[str, float] = {}
    dense = ref.model.eval()
    preset = ref.manifest["key"]["preset"]
    seq = preset["seq_len"]
    if recovery_lr is None:  # a quarter of the LR the reference model's training ended with (see the docstring)
        recovery_lr = preset["lr"] * preset["min_lr"] / 4
    # ---- data, the same for every method
    calib_all = windows(ref.train_ids, seq, calibration, seed=seed)
    calib = list(split_batches(calib_all, calib_batch))
    calib_fp = calibration_fingerprint(calib)
    g = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, ref.train_ids.numel() - seq, (recovery_steps * recovery_batch,), generator=g)
    rec = ref.train_ids[starts[:, None] + torch.arange(seq)[None, :]].view(recovery_steps, recovery_batch, seq)
    eval_in, eval_lab = refm.heldout_windows(ref.heldout_ids, eval_windows, seq)
    eval_proto = refm.window_protocol(
        int(eval_in.shape[0]), seq, int(ref.heldout_ids.numel()), ref.manifest["tokenizer"]["sha256"]
    )
    eval_proto["sha256"] = tensor_sha256(eval_in)

    def ppl(model) -> float:
        return refm.heldout_ppl(model, eval_in, eval_lab, batch_size=16)

    rows: list[dict] = []
    t = time.time()
    dense_ppl = ppl(dense)
    times["dense eval"] = time.time() - t
    t = time.time()
    control = copy.deepcopy(dense)
    rec_losses = recover(control, None, rec, recovery_lr)
    dense_after = ppl(control)
    del control
    times["dense recovery (control)"] = time.time() - t
    dense_nz = nonzero_params(dense)
    rows.append(
        {
            "setting": "dense",
            "method": "dense",
            "ppl_before": dense_ppl,
            "ppl_after": dense_after,
            "nonzero_params": dense_nz,
            "recovery_losses": rec_losses,
        }
    )
    log(
        f"dense: held-out ppl {dense_ppl:.3f}, after the control recovery {dense_after:.3f} "
        f"({times['dense recovery (control)']:.0f}s)"
    )

    # ---- statistics shared by the gradient criteria (dense model)
    grans = {s.granularity for s in settings}
    crits = {m.criterion for m in methods}
    search = {**DEFAULT_SEARCH, **(search or {})}
    search_heldout = windows(ref.train_ids, seq, search_windows, seed=seed + 2)
    shared = Shared(search_heldout=list(split_batches(search_heldout, calib_batch)), search=search, seed=seed)
    if crits & {"taylor", "gblm", "sdm", "saap"}:
        t = time.time()
        joint = any(m.allocation == "joint" for m in methods)
        shared.gradients = shared_gradients(
            dense,
            calib,
            {"mlp_neuron", "attention_head"} & (grans | ({"mlp_neuron", "attention_head"} if joint else set())),
        )
        times["shared dense gradients"] = time.time() - t
        log(f"shared dense gradients: {times['shared dense gradients']:.0f}s")
    saap_sigmas: dict[str, list[float]] = {}
    if "saap" in crits:
        joint_grans = {JOINT} if any(m.allocation == "joint" for m in methods) else set()
        for gran in sorted(grans & {"mlp_neuron", "attention_head", "query_head"} | joint_grans):
            t = time.time()
            # σ is learned from per-batch estimates: at least two batches
            est = saap_scores(
                dense, calib if len(calib) >= 2 else list(split_batches(calib_all, 1)), gran, progress=False
            )
            shared.saap_options[gran] = est.criterion_options()
            shared.saap_estimates[gran] = est
            saap_sigmas[gran] = list(next(iter(est.sigmas.values())))
            times[f"saap sigma {gran}"] = time.time() - t
            log(f"saap σ for {gran}: {saap_sigmas[gran]} ({times[f'saap sigma {gran}']:.0f}s)")

    operator_info = None
    if any(m.allocation == "search-llm" for m in methods):
        shared.operator, operator_info = operator_for(operator, seed)
        log(f"Self-Pruner's operator model: {operator_info['model']}")

    # ---- every cell
    for setting in settings:
        t_set = time.time()
        for method in methods:
            if not method.supports(setting.granularity):
                continue
            model = copy.deepcopy(dense)
            t0 = time.time()
            result, extra = apply_method(model, method, setting, calib, shared)
            t1 = time.time()
            before = ppl(model)
            t2 = time.time()
            losses = recover(model, result.masks, rec, recovery_lr)
            t3 = time.time()
            after = ppl(model)
            t4 = time.time()
            seen = (result.info.get("calibration") or {}).get("sha256")
            if seen is not None and seen != calib_fp["sha256"]:
                raise RuntimeError(f"{method.label}: calibration sha256 {seen} differs from {calib_fp['sha256']}")
            row = {
                "setting": setting.key,
                "method": method.label,
                "criterion": method.criterion,
                "options": method.resolved_options(calibration),
                "allocation": method.allocation,
                "scope": result.info.get("scope"),
                "granularity": setting.granularity,
                "sparsity": setting.sparsity,
                "ppl_before": before,
                "ppl_after": after,
                "nonzero_params": nonzero_params(model),
                "targeted_sparsity": result.report.targeted.fraction,
                "model_sparsity": result.report.model.fraction,
                "prune_s": t1 - t0,
                "eval_s": (t2 - t1) + (t4 - t3),
                "recovery_s": t3 - t2,
                "recovery_losses": losses,
                "calibration_sha256": seen,
                "mask_sha256": zeros_sha256(model),
                **extra,
            }
            rows.append(row)
            log(
                f"  {setting.label:14s} {method.label:16s} ppl {before:9.3f} -> {after:8.3f}   prune {t1 - t0:5.1f}s "
                f"eval {row['eval_s']:4.1f}s recovery {t3 - t2:5.1f}s"
            )
            del model, result
        times[f"setting {setting.key}"] = time.time() - t_set
    times["total"] = time.time() - t_start

    m = ref.manifest
    results = {
        "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "reference_model": {
            "path": str(ref.path),
            "preset": m.get("preset_name"),
            "parameters": m["parameters"],
            "parameters_without_embeddings": m["parameters_without_embeddings"],
            "config": {
                k: m["config"][k]
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "intermediate_size",
                    "vocab_size",
                    "tie_word_embeddings",
                )
            },
            "tokens_seen": m["tokens_seen"],
            "steps": m["steps"],
            "heldout_ppl": m["heldout_ppl"],
            "tokenizer_sha256": m["tokenizer"]["sha256"],
            "corpus_sha256": m["corpus"]["sha256"],
            "train_minutes": m["times"]["train_s"] / 60,
        },
        "protocol": {
            "eval": eval_proto,
            "calibration": {
                "sequences": calibration,
                "seq_len": seq,
                "batch": calib_batch,
                "seed": seed,
                "source": "seeded random windows of the train stream",
                **calib_fp,
            },
            "recovery": {
                "steps": recovery_steps,
                "batch": recovery_batch,
                "seq_len": seq,
                "tokens": recovery_steps * recovery_batch * seq,
                "lr": recovery_lr,
                "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0), constant LR, clip 1.0, masks held",
                "seed": seed + 1,
                "sha256": tensor_sha256(rec),
            },
            "sdm": {"stage_a": SDM_STAGE_A, "alpha": SDM_ALPHA, "temperature": SDM_TEMPERATURE},
            "saap_sigma": saap_sigmas,
            "allocation": "uniform (same fraction and count in every layer) unless the method says OWL, SAAP's "
            "ranking or Self-Pruner's search (per-layer rates, mean = the target)",
            "search": {
                **search,
                "fitness": f"perplexity on {search_windows} seeded windows of the train stream "
                f"(seed {seed + 2}), not the held-out text",
                "sha256": tensor_sha256(search_heldout),
            },
            "gradients": "dense-model CE gradients shared by taylor, gblm, sdm stage A, saap (one pass)",
            "self_pruner_operator": operator_info,
            "mutual_info_random_pairs": MI_RANDOM_PAIRS,
        },
        "settings": [asdict(s) for s in settings],
        "methods": [asdict(mm) for mm in methods],
        "rows": rows,
        "times": times,
        "threads": torch.get_num_threads(),
    }
    if out is not None:
        write_outputs(results, Path(out), settings, methods, plots)
    log(f"quality benchmark done in {times['total'] / 60:.1f} min")
    return results


# ---------------------------------------------------------------------------------------------- reporting
def _cells(results: dict) -> dict[tuple[str, str], dict]:
    return {(r["setting"], r["method"]): r for r in results["rows"]}


def _best(results: dict, setting: str, key: str) -> tuple[str, float] | None:
    rows = [r for r in results["rows"] if r["setting"] == setting and math.isfinite(r[key])]
    if not rows:
        return None
    r = min(rows, key=lambda r: r[key])
    return r["method"], r[key]


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"


def wide_table(results: dict, settings: list[Setting], methods: list[Method]) -> str:
    """method × setting, each cell ``before / after`` recovery, the best of a column in bold (each separately)."""
    cells = _cells(results)
    dense = cells[("dense", "dense")]
    head = "| method | " + " | ".join(s.label for s in settings) + " |"
    lines = [head, "|---|" + "---:|" * len(settings)]
    lines.append(
        "| dense (recovery: control) | "
        + " | ".join(f"{_fmt(dense['ppl_before'])} / {_fmt(dense['ppl_after'])}" for _ in settings)
        + " |"
    )
    best = {s.key: (_best(results, s.key, "ppl_before"), _best(results, s.key, "ppl_after")) for s in settings}
    for m in methods:
        if not any((s.key, m.label) in cells for s in settings):
            continue
        out = []
        for s in settings:
            r = cells.get((s.key, m.label))
            if r is None:
                out.append("–")
                continue
            b, a = _fmt(r["ppl_before"]), _fmt(r["ppl_after"])
            bb, ba = best[s.key]
            b = f"**{b}**" if bb and bb[0] == m.label else b
            a = f"**{a}**" if ba and ba[0] == m.label else a
            out.append(f"{b} / {a}")
        lines.append(f"| {m.label} | " + " | ".join(out) + " |")
    nz = []
    for s in settings:
        vals = {r["nonzero_params"] for r in results["rows"] if r["setting"] == s.key}
        nz.append(
            f"{min(vals) / 1e6:.3f}M"
            if len(vals) == 1
            else (f"{min(vals) / 1e6:.3f}–{max(vals) / 1e6:.3f}M" if vals else "–")
        )
    lines.append(f"| *nonzero params* (dense {dense['nonzero_params'] / 1e6:.2f}M) | " + " | ".join(nz) + " |")
    return "\n".join(lines)


def winners(results: dict, settings: list[Setting]) -> list[str]:
    out = []
    for s in settings:
        bb, ba = _best(results, s.key, "ppl_before"), _best(results, s.key, "ppl_after")
        if bb is None:
            continue
        out.append(
            f"- **{s.label}**: before recovery **{bb[0]}** ({_fmt(bb[1])}); after recovery **{ba[0]}** ({_fmt(ba[1])})."
        )
    return out


HEAD_TO_HEAD = [
    ("sparsegpt", "sparsegpt (per row)", "SparseGPT's block-wide selection (the paper's, default) vs per row"),
    (
        "wanda",
        "wanda (sum)",
        "Wanda-sp (down_proj / o_proj columns, default) vs Wanda summed over every coupled weight",
    ),
    ("magnitude", "magnitude (L1)", "magnitude: L2 norm of a group (default) vs L1"),
    ("gblm", "wanda", "GBLM (gradients + activations, α=100) vs Wanda (activations)"),
    ("gblm (authors' α)", "wanda", "GBLM with the authors' weighting (α=100·√N) vs Wanda"),
    ("sparsegpt", "wanda", "SparseGPT (reconstruction) vs Wanda"),
    ("wanda + OWL", "wanda", "OWL allocation vs uniform, with Wanda"),
    ("sdm", "taylor", "SDM (two-stage distillation gradients) vs Taylor (CE gradients)"),
    ("sdm", "taylor (vector)", "SDM vs Taylor, vector form (|Σ g·w| per group, as SDM's)"),
    ("saap", "taylor", "SAAP (fused vector + element) vs Taylor"),
    ("wanda", "magnitude", "Wanda vs magnitude"),
    ("mutual_info (clustered)", "magnitude", "mutual information (redundancy) vs magnitude"),
    ("mutual_info (random pairs)", "mutual_info (clustered)", "MI: the paper's random pairs vs the clustered greedy"),
    ("saap (joint)", "saap", "SAAP: heads and neurons under one budget vs one kind"),
    ("self-pruner (LLM operators)", "self-pruner (classical)", "Self-Pruner: LLM operators vs classical"),
]


def head_to_head(results: dict, settings: list[Setting]) -> list[str]:
    """For each pair, per setting where both ran: ppl before and after, and who is lower."""
    cells = _cells(results)
    out = []
    for a, b, title in HEAD_TO_HEAD:
        parts = []
        for s in settings:
            ra, rb = cells.get((s.key, a)), cells.get((s.key, b))
            if ra is None or rb is None:
                continue
            wins = []
            for k, when in (("ppl_before", "before"), ("ppl_after", "after")):
                x, y = ra[k], rb[k]
                w = a if x < y else b if y < x else "tie"
                wins.append(f"{when} {_fmt(x)} vs {_fmt(y)} ({w})")
            parts.append(f"{s.label}: " + ", ".join(wins))
        if parts:
            tally = sum(
                cells[(s.key, a)][k] < cells[(s.key, b)][k]
                for s in settings
                if (s.key, a) in cells and (s.key, b) in cells
                for k in ("ppl_before", "ppl_after")
            )
            n = 2 * len(parts)
            out.append(f"- {title}: **{a} lower in {tally} of {n}** comparisons. " + "; ".join(parts) + ".")
    return out


def identical_masks(results: dict, settings: list[Setting]) -> list[str]:
    """Per setting, the methods whose pruned models have exactly the same zeros (same ``mask_sha256``)."""
    out = []
    for s in settings:
        by: dict[str, list[str]] = {}
        for r in results["rows"]:
            if r["setting"] == s.key and r.get("mask_sha256"):
                by.setdefault(r["mask_sha256"], []).append(r["method"])
        same = [ms for ms in by.values() if len(ms) > 1]
        if same:
            out.append(f"- **{s.label}**: " + "; ".join(" = ".join(ms) for ms in same) + " (the same weights pruned).")
    return out or ["- none: every method pruned a different set of weights in every setting."]


def non_uniform(results: dict) -> list[str]:
    """The per-layer rates of every non-uniform row (and, for the search, its fitness against uniform rates)."""
    out = []
    for r in results["rows"]:
        rates = r.get("layer_rates")
        if rates is None:
            continue
        line = f"- {r['method']}, {r['setting']}: rates [{', '.join(f'{x:.3f}' for x in rates)}]"
        if "search_fitness" in r:
            line += (
                f"; search-split perplexity {r['search_fitness']:.3f} vs {r['search_uniform_fitness']:.3f} "
                f"for uniform rates ({r['search_evaluations']} candidates scored, {r['search_s']:.0f}s)"
            )
        if r.get("search_llm"):
            used = ", ".join(f"{op} {c['used']}/{c['proposed']}" for op, c in r["search_llm"].items())
            line += f"; operator answers used: {used}"
        out.append(line + ".")
    for r in results["rows"]:
        if "joint_kept" in r:
            kept = r["joint_kept"]
            heads = [kept[k] for k in kept if k.startswith("attention_head")]
            neurons = [kept[k] for k in kept if k.startswith("mlp_neuron")]
            out.append(
                f"- {r['method']}, {r['setting']}: KV groups kept per layer {heads}, MLP neurons kept {neurons} "
                f"({r['joint_removed_per_layer']:,} parameters removed per layer at most)."
            )
        if "mi_removable" in r:
            removable, seeds = list(r["mi_removable"].values()), list(r["mi_chosen_seed"].values())
            out.append(
                f"- {r['method']}, {r['setting']}: neurons the threshold lets go per layer {removable}, seeds kept "
                f"by the KL criterion {seeds}."
            )
    return out or ["- none in this run."]


def protocol_line(results: dict) -> str:
    r, p = results["reference_model"], results["protocol"]
    c = r["config"]
    return (
        f"Reference model: Llama, {r['parameters'] / 1e6:.1f}M parameters "
        f"({r['parameters_without_embeddings'] / 1e6:.1f}M "
        f"without the {'tied ' if c['tie_word_embeddings'] else ''}embeddings), hidden {c['hidden_size']}, "
        f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} query / {c['num_key_value_heads']} KV heads,"
        f" MLP {c['intermediate_size']}, BPE vocab {c['vocab_size']}, trained {r['steps']} steps "
        f"({r['tokens_seen'] / 1e6:.1f}M tokens) on the stdlib train split. Held-out perplexity per BPE token on "
        f"{p['eval']['windows']} windows of {p['eval']['seq_len']} tokens evenly spaced over held-out files; "
        f"{p['calibration']['sequences']} calibration windows of {p['calibration']['seq_len']} tokens, the same "
        f"for every method (sha256 {p['calibration']['sha256'][:12]}…); recovery: {p['recovery']['steps']} AdamW "
        f"steps × {p['recovery']['batch']} sequences ({p['recovery']['tokens']:,} tokens, lr "
        f"{p['recovery']['lr']:g}) with the masks held, the same batches for every method. Uniform allocation "
        "(same width in every layer) unless noted. Cells: ppl before / after recovery; best of a column in bold "
        "(each separately); – = not supported by the criterion."
    )


def readme_snippet(results: dict, settings: list[Setting], methods: list[Method]) -> str:
    return "\n".join(
        [
            wide_table(results, settings, methods),
            "",
            protocol_line(results),
            "",
            "![perplexity vs sparsity, unstructured and N:M](docs/quality_unstructured.png)",
            "![perplexity vs fraction of MLP neurons pruned](docs/quality_mlp.png)",
            "",
            f"Produced by `benchmarks/quality.py` ({results['times']['total'] / 60:.0f} min on "
            f"{results['threads']} threads); details, head-to-head comparisons and timings in "
            "[docs/quality.md](docs/quality.md).",
        ]
    )


def markdown(results: dict, settings: list[Setting], methods: list[Method]) -> str:
    cells = results["rows"]
    p = results["protocol"]
    lines = [
        "# Quality benchmark: criteria at equal sparsity on a trained Llama",
        "",
        f"Generated by `benchmarks/quality.py` on {results['generated']} in {results['times']['total'] / 60:.1f} "
        f"min ({results['threads']} threads). Raw numbers: `quality.json`.",
        "",
        protocol_line(results),
        "",
        "## Held-out perplexity, before / after recovery",
        "",
        wide_table(results, settings, methods),
        "",
        "![unstructured and N:M](quality_unstructured.png)",
        "",
        "![MLP neurons](quality_mlp.png)",
        "",
        "## What wins",
        "",
        *winners(results, settings),
        "",
        "## Head to head",
        "",
        *head_to_head(results, settings),
        "",
        "## Identical masks",
        "",
        *identical_masks(results, settings),
        "",
        "## Non-uniform allocations, joint selection, MI's random pairs",
        "",
        *non_uniform(results),
        "",
        "## Every cell",
        "",
        "| setting | method | ppl before | ppl after | × dense before | nonzero params | model sparsity | prune s | "
        "recovery s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense = results["rows"][0]
    for r in cells:
        lines.append(
            f"| {r['setting']} | {r['method']} | {_fmt(r['ppl_before'])} | {_fmt(r['ppl_after'])} | "
            f"{r['ppl_before'] / dense['ppl_before']:.2f} | {r['nonzero_params']:,} | "
            f"{r.get('model_sparsity', 0.0):.1%} | {r.get('prune_s', 0.0):.1f} | "
            f"{r.get('recovery_s', 0.0):.1f} |"
        )
    lines += [
        "",
        "## Protocol",
        "",
        "```json",
        json.dumps(p, indent=2),
        "```",
        "",
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.0f} |" for k, v in results["times"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, settings: list[Setting], methods: list[Method], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(results)
    dense = cells[("dense", "dense")]
    written = []
    groups = {
        "unstructured": (
            [s for s in settings if s.plot == "unstructured"],
            "pattern (50 % of the decoder weights)",
            "Unstructured / N:M",
        ),
        "mlp": (
            [s for s in settings if s.plot == "mlp"],
            "fraction of MLP neurons pruned (mean over the layers)",
            "MLP neurons",
        ),
    }
    markers = "osD^v<>pPX*hd"
    floor = 0.01  # % — a cell at or below dense (possible after recovery) is drawn on the floor
    for name, (sel, xlabel, title) in groups.items():
        if not sel:
            continue
        present = [m for m in methods if any((s.key, m.label) in cells for s in sel)]
        own = [m.label for m in present if m.form_of is None]
        cmap = matplotlib.colormaps["tab10" if len(own) <= 10 else "tab20"]
        colour = {label: cmap(i) for i, label in enumerate(own)}
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
        for ax, key, when in zip(axes, ("ppl_before", "ppl_after"), ("before recovery", "after recovery")):
            for i, m in enumerate(present):
                pts = [(s, cells[(s.key, m.label)][key]) for s in sel if (s.key, m.label) in cells]
                xs = [100 * s.sparsity if name == "mlp" else sel.index(s) for s, _ in pts]
                ys = [max(100 * (v / dense[key] - 1), floor) for _, v in pts]
                ax.plot(
                    xs,
                    ys,
                    marker=markers[i % len(markers)],
                    label=m.label,
                    color=colour.get(m.form_of or m.label, "grey"),
                    linestyle=":" if m.form_of else "-" if m.allocation == "uniform" else "--",
                )
            if name == "unstructured":
                ax.set_xticks(range(len(sel)), [s.label for s in sel])
                ax.set_xlim(-0.3, len(sel) - 0.7)
            else:
                ax.set_xticks([100 * s.sparsity for s in sel])
                ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(decimals=0))
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g} %"))
            ax.set_title(f"{title}, {when} (dense {_fmt(dense[key])})", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("held-out perplexity above dense (log scale)")
        axes[1].legend(
            fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            title="dashed: non-uniform rates; dotted: a criterion's other form",
            title_fontsize=7,
        )
        fig.tight_layout()
        path = out / f"quality_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(results: dict, out: Path, settings: list[Setting], methods: list[Method], plots: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(results, settings, methods))
    (out / "quality_table.md").write_text(readme_snippet(results, settings, methods) + "\n")
    if plots:
        plot(results, settings, methods, out)


def merge(earlier: dict, new: dict) -> dict:
    """``new``'s rows in ``earlier`` (a run of other methods on the same reference model and protocol: checked by
    the dense model's perplexity and the calibration hash), replacing rows of the same setting and method; old labels
    are renamed (``RENAMED``). Times and protocol entries of ``new`` are added under their own names."""
    if earlier["rows"][0]["ppl_before"] != new["rows"][0]["ppl_before"] or (
        earlier["protocol"]["calibration"]["sha256"] != new["protocol"]["calibration"]["sha256"]
    ):
        raise SystemExit("--merge-into: the earlier run used another reference model or calibration set")
    rows = [dict(r, method=RENAMED.get(r["method"], r["method"])) for r in earlier["rows"]]
    fresh = {(r["setting"], r["method"]) for r in new["rows"][1:]}
    rows = [r for r in rows if (r["setting"], r["method"]) not in fresh] + new["rows"][1:]
    order = {m.label: i for i, m in enumerate(METHODS)}
    rows = rows[:1] + sorted(
        rows[1:], key=lambda r: ([s.key for s in SETTINGS].index(r["setting"]), order.get(r["method"], 99))
    )
    protocol = {**earlier["protocol"], **{k: v for k, v in new["protocol"].items() if k not in earlier["protocol"]}}
    times = {**earlier["times"], **{f"merged run: {k}": v for k, v in new["times"].items()}}
    return {**earlier, "rows": rows, "protocol": protocol, "times": times, "merged": new["generated"]}


def pick(items, names: str | None, key) -> list:
    if not names:
        return list(items)
    want = [n.strip() for n in names.split(",") if n.strip()]
    by = {key(i): i for i in items}
    bad = [n for n in want if n not in by]
    if bad:
        raise SystemExit(f"unknown {bad}; choose from {list(by)}")
    return [by[n] for n in want]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=list(refm.PRESETS), help="reference model preset")
    ap.add_argument("--ref-steps", type=int, default=None, help="the reference model trained with other steps")
    ap.add_argument("--ref-batch", type=int, default=None, help="the reference model trained with another batch")
    ap.add_argument("--cache", type=Path, default=refm.DEFAULT_CACHE)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (also where the reference model is trained)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {[m.label for m in METHODS]}")
    ap.add_argument("--settings", default=None, help=f"comma-separated subset of {[s.key for s in SETTINGS]}")
    ap.add_argument("--calibration", type=int, default=64, help="calibration sequences (model seq_len each)")
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows (model seq_len each)")
    ap.add_argument("--recovery-steps", type=int, default=16)
    ap.add_argument("--recovery-batch", type=int, default=8)
    ap.add_argument(
        "--recovery-lr", type=float, default=None, help="default: a quarter of the reference model's final training LR"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--search-windows", type=int, default=16, help="Self-Pruner's fitness split (train stream)")
    ap.add_argument("--search-population", type=int, default=DEFAULT_SEARCH["population"])
    ap.add_argument("--search-generations", type=int, default=DEFAULT_SEARCH["generations"])
    ap.add_argument(
        "--operator-model",
        default=None,
        help="Self-Pruner's operator model for the LLM-operator row: a local path, 'scripted', or (default) the demo "
        "model fine-tuned on operator prompts (benchmarks/operator_model.py, cached)",
    )
    ap.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        help="merge this run's rows into an earlier quality.json (same reference model and protocol), write there",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="only rewrite the tables and plots from a quality.json (e.g. docs/quality.json)",
    )
    args = ap.parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        results["rows"] = [dict(r, method=RENAMED.get(r["method"], r["method"])) for r in results["rows"]]
        keys, labels = {r["setting"] for r in results["rows"]}, {r["method"] for r in results["rows"]}
        write_outputs(
            results, args.out, [s for s in SETTINGS if s.key in keys], [m for m in METHODS if m.label in labels]
        )
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.time()
    preset, name = refm.preset_and_name(args.preset, args.ref_steps, args.ref_batch)
    ref = refm.load_or_train(preset, args.cache, args.device, name=name)
    ref.model.to(args.device)
    print(f"reference model ready ({time.time() - t:.0f}s)")
    results = run(
        ref,
        settings=pick(SETTINGS, args.settings, lambda s: s.key),
        methods=pick(METHODS, args.methods, lambda m: m.label),
        calibration=args.calibration,
        eval_windows=args.eval_windows,
        recovery_steps=args.recovery_steps,
        recovery_batch=args.recovery_batch,
        recovery_lr=args.recovery_lr,
        seed=args.seed,
        search_windows=args.search_windows,
        search={"population": args.search_population, "generations": args.search_generations},
        operator=args.operator_model,
        out=args.out if args.merge_into is None else None,
    )
    if args.merge_into is not None:
        results = merge(json.loads(args.merge_into.read_text()), results)
        keys, labels = {r["setting"] for r in results["rows"]}, {r["method"] for r in results["rows"]}
        write_outputs(
            results, args.out, [s for s in SETTINGS if s.key in keys], [m for m in METHODS if m.label in labels]
        )
    return results


if __name__ == "__main__":
    main()
