"""Self-Pruner (2025): evolutionary search of per-layer pruning rates, optionally with a language model as the
genetic operator.

Find rates ``p_1..p_L`` with ``mean(p) = target`` that minimise the held-out perplexity of the structurally pruned
model. A population of candidates evolves for ``generations`` rounds; each round adds ``mutations`` mutants and
``crossovers`` children of selected parents, and the best ``population`` distinct candidates survive (elitist).
The constraint is never left to the operators: every candidate, whoever proposed it, goes through the repair
:func:`pruning.allocation.rates.project_rates` (whole groups, ``[0, max_rate]``, mean = target) before it is scored.

Operators are classical (random initial population around the uniform one, tournament selection, Gaussian
mutation, uniform crossover) unless an operator model is given (:class:`~pruning.allocation.operators.LLMOperator`:
a local Hugging Face causal LM, or an OpenAI-compatible chat endpoint): then each of the paper's four operators
named in ``llm_operators`` (default all: initialisation, selection, crossover, mutation) is first asked of that
model, prompted as the paper does; its answer is parsed and validated (lists: one number per layer, each in
``[0, 1)``; indices: in the population); an unusable answer falls back to the classical operator, and the history
counts both, per operator.

``pruning search`` (:mod:`pruning.commands.search`) runs the search on a model and writes the best rates for a
recipe's ``PruningCallback(allocation: rates, rates_file: ...)``.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import allocation as alloc
from ..evaluation.perplexity import perplexity
from ..importance import Criterion
from ..io import write_json
from ..options import PruneOptions
from ..pipeline.calibration import calibration_batches, collect_gradients
from ..pipeline.drive import collect_activations
from ..pipeline.pruner import Pruner
from ..structure import ModelStructure
from .operators import LLM_OPERATORS, LLMOperator, warn_if_mostly_classical
from .rates import project_rates

SEARCH_GRANULARITIES = ("mlp_neuron", "attention_head", "query_head")
Fitness = Callable[[Sequence[float]], float]


# ---------------------------------------------------------------------------------------------- fitness
def dense_group_scores(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    criterion: str = "wanda",
    granularity: str = "mlp_neuron",
    criterion_options: dict | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[list[torch.Tensor], Criterion]:
    """Group scores of every layer from statistics of the dense model over ``calibration`` (all layers at once, as
    the Lightning callbacks score), and the criterion that gave them. They do not depend on the rates, so one pass
    serves every candidate."""
    options = PruneOptions(
        method=criterion, granularity=granularity, criterion_options=criterion_options or {}, sparsity=0.0
    )
    if granularity not in SEARCH_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: the rate search prunes {list(SEARCH_GRANULARITIES)}")
    pruner = Pruner(model, options)
    calibration = calibration_batches(calibration)
    activations = collect_activations(pruner, calibration, device)
    gradients = pruner.gradient_collector()
    if gradients is not None:
        collect_gradients(model, calibration, gradients, device=device, progress=progress)
    ctx = pruner.context(activations, gradients)
    return [pruner.criterion.group_scores(gs, ctx).float().cpu() for gs in pruner.targets.group_sets], pruner.criterion


class PrunedPerplexity:
    """``fitness(rates)``: held-out perplexity of ``model`` with each layer's lowest-scoring groups removed.

    Scores come once from the dense model (:func:`dense_group_scores`); a candidate keeps the top groups of each
    layer (``allocation.topk_keep``, the counts of ``pruning.prune(allocation='rates')``), its pruned rows and
    columns are zeroed in place, the perplexity on ``heldout`` is measured and the values are written back. A
    zeroed group gives the same logits as the physically smaller model (``pruning.compact``), so this is the
    structurally pruned model's perplexity without building it. Nothing but the pruned slices is copied.
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: Sequence[torch.Tensor],
        heldout: Sequence[torch.Tensor],
        criterion: str = "wanda",
        granularity: str = "mlp_neuron",
        criterion_options: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.heldout = list(heldout)
        self.device = device
        self.group_sets = ModelStructure(model).group_sets(granularity)  # type: ignore[arg-type]
        self.scores, self.criterion = dense_group_scores(
            model, calibration, criterion, granularity, criterion_options, device, progress
        )
        self.params = dict(model.named_parameters(remove_duplicate=False))

    @property
    def counts(self) -> list[int]:
        return [gs.count for gs in self.group_sets]

    @property
    def partitions(self) -> int:
        return self.group_sets[0].partitions

    def keep_vectors(self, rates: Sequence[float]) -> list[torch.Tensor]:
        out = []
        for gs, s, r in zip(self.group_sets, self.scores, rates):
            keep_n = alloc.keep_counts_uniform([gs.count], float(r), gs.partitions)[0]
            # a criterion's own stopping rule (mutual information's threshold) may keep more, as in pruning.prune
            keep_n = max(keep_n, self.criterion.min_keep_count(gs))
            out.append(alloc.topk_keep(s, keep_n, gs.partitions))
        return out

    @torch.no_grad()
    def __call__(self, rates: Sequence[float]) -> float:
        saved = []
        try:
            for gs, keep in zip(self.group_sets, self.keep_vectors(rates)):
                pruned = (~keep).nonzero().flatten()
                if not pruned.numel():
                    continue
                for m in gs.members:
                    p = self.params[m.name]
                    idx = m.positions(pruned).to(p.device)
                    saved.append((p, m.dim, idx, p.index_select(m.dim, idx).clone()))
                    p.index_fill_(m.dim, idx, 0)
            return perplexity(self.model, self.heldout, self.device)
        finally:
            for p, dim, idx, vals in reversed(saved):
                p.index_copy_(dim, idx, vals)


# ---------------------------------------------------------------------------------------------- the search
@dataclass
class SearchResult:
    """Best rates found, their fitness, the uniform allocation's fitness and the whole history (also on disk)."""

    rates: list[float]
    fitness: float
    uniform_fitness: float
    history: dict = field(default_factory=dict)


class Evolution:
    """Self-Pruner's evolutionary search over per-layer rates, for any ``fitness`` (lower is better).

    ``counts``: groups per layer (``partitions`` as in :func:`~pruning.allocation.rates.project_rates`). The initial
    population is the uniform allocation plus random ones (``target + init_scale·N(0, 1)`` per layer, repaired);
    parents are chosen by tournament (best of ``tournament`` drawn at random); a classical mutation adds
    ``mutation_scale·N(0, 1)`` to a random half of the layers, a classical crossover takes each layer's rate from
    one parent or the other. With an ``operator`` model, the operators named in ``llm_operators`` are first asked
    of it: the initial population (after the uniform allocation, which is always its first member: the reference
    every search reports against) in requests of ``init_batch`` lists, filled up classically when the answers fall
    short; the parents of every crossover and mutation (indices into the population, best first); the crossover
    child and the mutant. Every candidate is repaired and keyed by its pruned counts per layer; fitness is cached on
    that key, so a candidate met twice is scored once. With ``history_path`` the history is rewritten (atomically)
    after every generation; ``info`` is recorded in it as well. ``history['offspring']`` records every child with
    its parents (indices into that generation's population) and who chose them.
    """

    def __init__(
        self,
        counts: Sequence[int],
        target: float,
        fitness: Fitness,
        *,
        partitions: int = 1,
        population: int = 30,
        generations: int = 20,
        mutations: int = 10,
        crossovers: int = 10,
        operator: LLMOperator | None = None,
        llm_operators: Sequence[str] = LLM_OPERATORS,
        init_batch: int = 10,
        max_rate: float = 0.9,
        mutation_scale: float = 0.05,
        init_scale: float = 0.1,
        tournament: int = 3,
        seed: int = 0,
        history_path: str | os.PathLike | None = None,
        info: dict | None = None,
    ) -> None:
        for name, v in (("population", population), ("generations", generations), ("init_batch", init_batch)):
            if v < 1:
                raise ValueError(f"{name}={v} must be >= 1")
        if mutations < 0 or crossovers < 0 or mutations + crossovers == 0:
            raise ValueError(f"mutations={mutations}, crossovers={crossovers}: need at least one new candidate a round")
        unknown = sorted(set(llm_operators) - set(LLM_OPERATORS))
        if unknown:
            raise ValueError(
                f"llm_operators={list(llm_operators)}: {unknown} unknown; choose from {list(LLM_OPERATORS)}"
            )
        self.counts, self.target, self.fitness, self.partitions = list(counts), target, fitness, partitions
        self.size, self.generations, self.mutations, self.crossovers = population, generations, mutations, crossovers
        self.operator, self.max_rate, self.tournament = operator, max_rate, tournament
        self.llm_operators = tuple(op for op in LLM_OPERATORS if op in llm_operators) if operator is not None else ()
        self.init_batch = init_batch
        self.mutation_scale, self.init_scale = mutation_scale, init_scale
        self.history_path = history_path
        self.rng = random.Random(seed)
        self.units = [c // max(1, partitions) for c in counts]
        self.cache: dict[tuple[int, ...], float] = {}
        self.stats: dict = {"evaluations": 0, "cache_hits": 0, "llm_proposed": 0, "llm_used": 0, "llm_fallback": 0}
        if self.llm_operators:
            self.stats["llm"] = {op: {"proposed": 0, "used": 0, "fallback": 0} for op in self.llm_operators}
        self.history: dict = {
            "method": "self-pruner",
            "target": target,
            "counts": list(counts),
            "partitions": partitions,
            "max_rate": max_rate,
            "seed": seed,
            "population": population,
            "generations_planned": generations,
            "mutations": mutations,
            "crossovers": crossovers,
            "operator": operator.path if operator is not None else "classical",
            "llm_operators": list(self.llm_operators),
            **dict(info or {}),
            "generations": [],
            "evaluated": [],
            "offspring": [],
            "stats": self.stats,
            "llm_failures": {},
            "llm_answers": [],  # every answer of the operator model (first 300 characters), for inspection
        }

    # ---------------------------------------------------------------------------------------------- candidates
    def repair(self, rates: Sequence[float]) -> list[float]:
        return project_rates(rates, self.target, self.counts, self.partitions, self.max_rate)

    def key(self, rates: Sequence[float]) -> tuple[int, ...]:
        return tuple(int(round(r * u)) for r, u in zip(rates, self.units))

    def score(self, rates: list[float], origin: str, generation: int) -> dict:
        """A candidate with its fitness (cached by its pruned counts per layer)."""
        k = self.key(rates)
        if k in self.cache:
            self.stats["cache_hits"] += 1
        else:
            t0 = time.perf_counter()
            self.cache[k] = float(self.fitness(rates))
            self.stats["evaluations"] += 1
            self.history["evaluated"].append(
                {
                    "generation": generation,
                    "origin": origin,
                    "rates": rates,
                    "fitness": self.cache[k],
                    "pruned": list(k),
                    "mean_rate": sum(rates) / len(rates),
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            )
        return {"rates": rates, "fitness": self.cache[k], "origin": origin, "key": k}

    # ---------------------------------------------------------------------------------------------- operators
    def asks(self, op: str) -> bool:
        """Whether operator ``op`` is first asked of the operator model."""
        return op in self.llm_operators

    def count(self, op: str, used: int, fallback: int) -> None:
        """``used`` answers of the model and ``fallback`` classical stand-ins for operator ``op``."""
        s = self.stats["llm"][op]
        s["proposed"] += used + fallback
        s["used"] += used
        s["fallback"] += fallback
        self.stats["llm_proposed"] += used + fallback
        self.stats["llm_used"] += used
        self.stats["llm_fallback"] += fallback

    def note_answer(self, op: str, usable: bool, reason: str, answer: str) -> None:
        self.history["llm_answers"].append({"kind": op, "usable": usable, "reason": reason, "answer": answer[:300]})
        if not usable:
            failures = self.history["llm_failures"]
            failures[reason] = failures.get(reason, 0) + 1

    def pick(self, pop: list[dict]) -> int:
        """Tournament selection: the index of the best of ``tournament`` candidates drawn at random."""
        return min(self.rng.sample(range(len(pop)), min(self.tournament, len(pop))), key=lambda i: pop[i]["fitness"])

    def select(self, pop: list[dict], count: int, purpose: str) -> tuple[list[int], str]:
        """Indices of ``count`` parents in ``pop`` (sorted, best first) and who chose them (``llm``/``tournament``)."""
        if self.asks("selection"):
            scored = [(c["rates"], c["fitness"]) for c in pop]
            idx, reason, answer = self.operator.select(scored, count, purpose, self.target, self.max_rate)
            self.note_answer("selection", idx is not None, reason, answer)
            self.count("selection", int(idx is not None), int(idx is None))
            if idx is not None:
                return idx, "llm"
        return [self.pick(pop) for _ in range(count)], "tournament"

    def classical(self, kind: str, parents: list[list[float]]) -> list[float]:
        n = len(self.counts)
        if kind == "crossover":
            return [parents[self.rng.random() < 0.5][i] for i in range(n)]
        child = list(parents[0])
        for i in self.rng.sample(range(n), max(1, n // 2)):
            child[i] += self.mutation_scale * self.rng.gauss(0.0, 1.0)
        return child

    def operate(self, kind: str, parents: list[list[float]], pop: list[dict]) -> tuple[list[float], str]:
        """A crossover or mutation: the operator model's answer when it gives a usable one, else the classical."""
        if self.asks(kind):
            proposed, reason, answer = self.operator.propose(
                kind, parents, [(c["rates"], c["fitness"]) for c in pop], self.target, self.max_rate
            )
            child = None if proposed is None else self.repair(proposed)
            if child is not None and any(child == p for p in parents):  # a restated parent is not an answer
                child, reason = None, "a copy of a parent"
            self.note_answer(kind, child is not None, reason, answer)
            self.count(kind, int(child is not None), int(child is None))
            if child is not None:
                return child, f"llm-{kind}"
        return self.repair(self.classical(kind, parents)), kind

    # ---------------------------------------------------------------------------------------------- the run
    def initial_population(self) -> list[dict]:
        n = len(self.counts)
        uniform = self.repair([self.target] * n)
        pop = [self.score(uniform, "uniform", 0)]
        self.history["uniform"] = {"rates": uniform, "fitness": pop[0]["fitness"]}
        seen = {pop[0]["key"]}
        if self.asks("initialisation"):
            wanted = self.size - 1
            for _ in range(math.ceil(wanted / self.init_batch)):
                ask = min(self.init_batch, self.size - len(pop))
                if ask <= 0:
                    break
                lists, reason, answer = self.operator.initialise(ask, n, self.target, self.max_rate)
                self.note_answer("initialisation", bool(lists), reason, answer)
                for rates in lists:
                    cand = self.score(self.repair(rates), "llm-init", 0)
                    if cand["key"] not in seen and len(pop) < self.size:
                        seen.add(cand["key"])
                        pop.append(cand)
            used = len(pop) - 1
            self.count("initialisation", used, wanted - used)
        tries = 0
        while len(pop) < self.size and tries < 20 * self.size:
            tries += 1
            rates = self.repair([self.target + self.init_scale * self.rng.gauss(0.0, 1.0) for _ in range(n)])
            cand = self.score(rates, "random", 0)
            if cand["key"] not in seen:
                seen.add(cand["key"])
                pop.append(cand)
        return pop

    def child(self, kind: str, pop: list[dict], gen: int) -> dict:
        """One crossover child or mutant of parents selected from ``pop`` (sorted, best first), scored."""
        idx, by = self.select(pop, 2 if kind == "crossover" else 1, kind)
        rates, origin = self.operate(kind, [pop[i]["rates"] for i in idx], pop)
        cand = self.score(rates, origin, gen)
        self.history["offspring"].append(
            {
                "generation": gen,
                "origin": origin,
                "selection": by,
                "parents": idx,
                "rates": rates,
                "fitness": cand["fitness"],
            }
        )
        return cand

    def generation(self, pop: list[dict], gen: int) -> list[dict]:
        """One round: crossovers, then mutations, then the best ``population`` distinct candidates survive."""
        pop = sorted(pop, key=lambda c: c["fitness"])  # the numbering the selection prompt shows
        children = [self.child("crossover", pop, gen) for _ in range(self.crossovers)]
        children += [self.child("mutation", pop, gen) for _ in range(self.mutations)]
        merged = {c["key"]: c for c in children}
        merged.update({c["key"]: c for c in pop})  # a survivor keeps its origin
        return sorted(merged.values(), key=lambda c: c["fitness"])[: self.size]

    def record(self, pop: list[dict], gen: int) -> None:
        pop.sort(key=lambda c: c["fitness"])
        self.history["generations"].append(
            {
                "generation": gen,
                "best_fitness": pop[0]["fitness"],
                "best_rates": pop[0]["rates"],
                "population": [{"rates": c["rates"], "fitness": c["fitness"], "origin": c["origin"]} for c in pop],
                **copy.deepcopy(self.stats),
            }
        )
        self.history["best"] = {"rates": pop[0]["rates"], "fitness": pop[0]["fitness"]}
        if self.history_path is not None:
            write_json(self.history_path, self.history)

    def run(self, progress: bool = True) -> SearchResult:
        pop = self.initial_population()
        self.record(pop, 0)
        bar = tqdm(range(1, self.generations + 1), desc="self-pruner", unit="gen", disable=not progress)
        for gen in bar:
            pop = self.generation(pop, gen)
            self.record(pop, gen)
            llm = {"llm": f"{self.stats['llm_used']}/{self.stats['llm_proposed']}"} if self.llm_operators else {}
            bar.set_postfix(best=f"{pop[0]['fitness']:.4g}", evals=self.stats["evaluations"], **llm)
        bar.close()
        warn_if_mostly_classical(self.stats["llm_used"], self.stats["llm_proposed"], self.history["llm_failures"])
        best = pop[0]
        return SearchResult(best["rates"], best["fitness"], self.history["uniform"]["fitness"], self.history)


def evolve(
    counts: Sequence[int], target: float, fitness: Fitness, *, progress: bool = True, **settings
) -> SearchResult:
    """:class:`Evolution` run to the end (``settings``: its keyword arguments)."""
    return Evolution(counts, target, fitness, **settings).run(progress)


def search_rates(
    model: nn.Module,
    calibration: Sequence[torch.Tensor] | None,
    heldout: Sequence[torch.Tensor] | None,
    target: float,
    criterion: str = "wanda",
    granularity: str = "mlp_neuron",
    *,
    criterion_options: dict | None = None,
    population: int = 30,
    generations: int = 20,
    mutations: int = 10,
    crossovers: int = 10,
    operator_model: str | LLMOperator | None = None,
    operator_options: dict | None = None,
    llm_operators: Sequence[str] = LLM_OPERATORS,
    seed: int = 0,
    progress: bool = True,
    history_path: str | os.PathLike | None = None,
    max_rate: float = 0.9,
    mutation_scale: float = 0.05,
    init_scale: float = 0.1,
    device: torch.device | str | None = None,
    fitness: Fitness | None = None,
) -> SearchResult:
    """Self-Pruner's search of per-layer rates with mean ``target`` for ``granularity`` groups of ``model``.

    Fitness (lower is better) is the perplexity on ``heldout`` (a split of the calibration data, not the test set)
    of the model pruned by ``criterion`` with the candidate's rates (:class:`PrunedPerplexity`: scores from
    ``calibration`` on the dense model, computed once, then top-k per layer), or ``fitness(rates)`` when given
    (then ``calibration``/``heldout`` are not used). ``operator_model``: the genetic operator model, a ready
    :class:`LLMOperator` (e.g. over a :class:`~pruning.allocation.operators.ChatEndpoint`) or the path of a local
    causal LM (``operator_options`` for :class:`~pruning.allocation.operators.LocalCausalLM`), asked for the
    operators in ``llm_operators``. Everything else: see :class:`Evolution`.

    The best rates serve any criterion: ``pruning.prune(model, calib, method, target, granularity,
    allocation='rates', layer_rates=result.rates)`` (the search's criterion is the one they were tuned for).
    """
    structure = ModelStructure(model)
    if granularity not in SEARCH_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: the rate search prunes {list(SEARCH_GRANULARITIES)}")
    group_sets = structure.group_sets(granularity)  # type: ignore[arg-type]
    if fitness is None:
        if not calibration or not heldout:
            raise ValueError("search_rates needs calibration and heldout batches (or a fitness= function)")
        fitness = PrunedPerplexity(
            model, list(calibration), list(heldout), criterion, granularity, criterion_options, device, progress
        )
    operator = operator_model
    if isinstance(operator_model, str):
        operator = LLMOperator(operator_model, seed=seed, **dict(operator_options or {}))
    result = evolve(
        [gs.count for gs in group_sets],
        target,
        fitness,
        partitions=group_sets[0].partitions,
        population=population,
        generations=generations,
        mutations=mutations,
        crossovers=crossovers,
        operator=operator,
        llm_operators=llm_operators,
        max_rate=max_rate,
        mutation_scale=mutation_scale,
        init_scale=init_scale,
        seed=seed,
        progress=progress,
        history_path=history_path,
        info={"criterion": criterion, "granularity": granularity, "criterion_options": dict(criterion_options or {})},
    )
    return result
