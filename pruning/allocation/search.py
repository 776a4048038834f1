"""Self-Pruner (2025): evolutionary search of per-layer pruning rates, optionally with a language model as the
genetic operator.

Find rates ``p_1..p_L`` with ``mean(p) = target`` that minimise the held-out perplexity of the structurally pruned
model. A population of candidates evolves for ``generations`` rounds; each round adds ``mutations`` mutants and
``crossovers`` children of tournament-selected parents, and the best ``population`` distinct candidates survive
(elitist). The constraint is never left to the operators: every candidate, whoever proposed it, goes through the
repair :func:`pruning.allocation.rates.project_rates` (whole groups, ``[0, max_rate]``, mean = target) before it
is scored.

Operators are classical (Gaussian mutation, uniform crossover) unless ``operator_model`` names a local Hugging
Face causal LM: then every mutation and crossover is first asked of that model, prompted as the paper does (the
population with its perplexities, the parents, the constraint, the answer format); its answer is parsed
(the first bracketed list of numbers), validated (one number per layer, each in ``[0, 1)``) and repaired; an
unusable answer falls back to the classical operator, and the history counts both.

``pruning search`` (:mod:`pruning.commands.search`) runs the search on a model and writes the best rates for a
recipe's ``PruningCallback(allocation: rates, rates_file: ...)``.
"""

from __future__ import annotations

import math
import os
import random
import re
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
from ..loading import from_pretrained
from ..options import PruneOptions
from ..pipeline.calibration import calibration_batches, collect_gradients
from ..pipeline.drive import collect_activations
from ..pipeline.pruner import Pruner
from ..structure import ModelStructure
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
                    idx = (pruned[:, None] * m.size + torch.arange(m.size)).flatten().to(p.device)
                    saved.append((p, m.dim, idx, p.index_select(m.dim, idx).clone()))
                    p.index_fill_(m.dim, idx, 0)
            return perplexity(self.model, self.heldout, self.device)
        finally:
            for p, dim, idx, vals in reversed(saved):
                p.index_copy_(dim, idx, vals)


# ---------------------------------------------------------------------------------------------- LLM operator
_LIST = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def parse_rates(text: str, n_layers: int) -> tuple[list[float] | None, str]:
    """The first bracketed list in ``text`` with one number per layer, each in ``[0, 1)``: ``(rates, 'ok')``, or
    ``(None, reason)`` when no list in the answer is usable."""
    reason = "no bracketed list of numbers"
    for body in _LIST.findall(text):
        nums = _NUMBER.findall(body)
        if not nums:
            continue
        if len(nums) != n_layers:
            reason = f"a list of {len(nums)} numbers, not {n_layers}"
            continue
        vals = [float(x) for x in nums]
        if not all(math.isfinite(v) and 0 <= v < 1 for v in vals):
            reason = "rates outside [0, 1)"
            continue
        return vals, "ok"
    return None, reason


class LLMOperator:
    """A local Hugging Face causal LM asked to do crossover and mutation, as Self-Pruner does with GPT-4.

    The prompt lists the best candidates of the population with their perplexity (lower is better), states the
    constraint (mean rate, range) and the operator, names the parent(s) and asks for one new list
    ``[r1, ..., rL]``. Generation is sampled (``temperature``, ``top_p``), at most ``max_new_tokens`` tokens, with
    the global random state left untouched. A chat template is used when the tokenizer has one.
    """

    def __init__(
        self,
        path: str,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        shown: int = 10,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = from_pretrained(path, key="operator_model").eval()
        if device is not None:
            self.model.to(device)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.shown = shown
        self.seed = seed
        self.calls = 0

    def prompt(
        self,
        kind: str,
        parents: Sequence[Sequence[float]],
        population: Sequence[tuple[list[float], float]],
        target: float,
        max_rate: float,
    ) -> str:
        n = len(parents[0])
        shown = sorted(population, key=lambda c: c[1])[: self.shown]
        lines = [
            f"You are an expert in pruning large language models. A model with {n} decoder layers is pruned "
            f"layer by layer: rate r_i is the fraction of layer i's structures that are removed. The average of "
            f"the {n} rates must be {target:.4f} and every rate must be between 0 and {max_rate:.2f}. Lower "
            "perplexity is better.",
            "Here are pruning-rate lists found so far with their perplexity:",
        ]
        lines += [f"{_fmt(r)} perplexity: {f:.4f}" for r, f in shown]
        if kind == "crossover":
            lines.append(
                f"Combine the two parents {_fmt(parents[0])} and {_fmt(parents[1])} by crossover into one "
                "new list that should have a lower perplexity."
            )
        else:
            lines.append(f"Mutate the parent {_fmt(parents[0])} into one new list that should have a lower perplexity.")
        lines.append(f"Answer with the new list only, {n} numbers in square brackets: [r1, r2, ..., r{n}]")
        return "\n".join(lines)

    @torch.no_grad()
    def generate(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt + "\n"
        ids = tok(text, return_tensors="pt").input_ids
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + self.max_new_tokens > limit:
            ids = ids[:, -(limit - self.max_new_tokens) :]  # keep the end: the question and the answer format
        ids = ids.to(self.model.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.calls += 1
        dev = self.model.device
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed * 100003 + self.calls)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad if pad is not None else 0,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def propose(
        self,
        kind: str,
        parents: Sequence[Sequence[float]],
        population: Sequence[tuple[list[float], float]],
        target: float,
        max_rate: float,
    ) -> tuple[list[float] | None, str, str]:
        """``(rates or None, reason, answer)`` for one crossover or mutation."""
        answer = self.generate(self.prompt(kind, parents, population, target, max_rate))
        rates, reason = parse_rates(answer, len(parents[0]))
        return rates, reason, answer


def _fmt(rates: Sequence[float]) -> str:
    return "[" + ", ".join(f"{r:.3f}" for r in rates) + "]"


# ---------------------------------------------------------------------------------------------- the search
@dataclass
class SearchResult:
    """Best rates found, their fitness, the uniform allocation's fitness and the whole history (also on disk)."""

    rates: list[float]
    fitness: float
    uniform_fitness: float
    history: dict = field(default_factory=dict)


def evolve(
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
    max_rate: float = 0.9,
    mutation_scale: float = 0.05,
    init_scale: float = 0.1,
    tournament: int = 3,
    seed: int = 0,
    progress: bool = True,
    history_path: str | os.PathLike | None = None,
    info: dict | None = None,
) -> SearchResult:
    """The evolutionary search over per-layer rates, for any ``fitness`` (lower is better).

    ``counts``: groups per layer (``partitions`` as in :func:`~pruning.allocation.rates.project_rates`). The initial
    population is the uniform allocation plus random ones (``target + init_scale·N(0, 1)`` per layer, repaired);
    parents are chosen by tournament (best of ``tournament`` drawn at random); a classical mutation adds
    ``mutation_scale·N(0, 1)`` to a random half of the layers, a classical crossover takes each layer's rate from
    one parent or the other. Every candidate is repaired and keyed by its pruned counts per layer; fitness is
    cached on that key, so a candidate met twice is scored once. With ``history_path`` the history is rewritten
    (atomically) after every generation; ``info`` is recorded in it as well.
    """
    for name, v in (("population", population), ("generations", generations)):
        if v < 1:
            raise ValueError(f"{name}={v} must be >= 1")
    if mutations < 0 or crossovers < 0 or mutations + crossovers == 0:
        raise ValueError(f"mutations={mutations}, crossovers={crossovers}: need at least one new candidate a round")
    rng = random.Random(seed)
    n = len(counts)
    units = [c // max(1, partitions) for c in counts]
    cache: dict[tuple[int, ...], float] = {}
    evaluated: list[dict] = []
    stats = {"evaluations": 0, "cache_hits": 0, "llm_proposed": 0, "llm_used": 0, "llm_fallback": 0}
    llm_failures: dict[str, int] = {}
    llm_answers: list[dict] = []  # every answer of the operator model (first 300 characters), for inspection

    def repair(rates: Sequence[float]) -> list[float]:
        return project_rates(rates, target, counts, partitions, max_rate)

    def key(rates: Sequence[float]) -> tuple[int, ...]:
        return tuple(int(round(r * u)) for r, u in zip(rates, units))

    def score(rates: list[float], origin: str, generation: int) -> dict:
        k = key(rates)
        if k in cache:
            stats["cache_hits"] += 1
        else:
            t0 = time.perf_counter()
            cache[k] = float(fitness(rates))
            stats["evaluations"] += 1
            evaluated.append(
                {
                    "generation": generation,
                    "origin": origin,
                    "rates": rates,
                    "fitness": cache[k],
                    "pruned": list(k),
                    "mean_rate": sum(rates) / n,
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            )
        return {"rates": rates, "fitness": cache[k], "origin": origin, "key": k}

    def pick(pop: list[dict]) -> dict:
        return min(rng.sample(pop, min(tournament, len(pop))), key=lambda c: c["fitness"])

    def classical(kind: str, parents: list[list[float]]) -> list[float]:
        if kind == "crossover":
            return [parents[rng.random() < 0.5][i] for i in range(n)]
        child = list(parents[0])
        layers = rng.sample(range(n), max(1, n // 2))
        for i in layers:
            child[i] += mutation_scale * rng.gauss(0.0, 1.0)
        return child

    def operate(kind: str, parents: list[list[float]], pop: list[dict]) -> tuple[list[float], str]:
        if operator is not None:
            stats["llm_proposed"] += 1
            proposed, reason, answer = operator.propose(
                kind, parents, [(c["rates"], c["fitness"]) for c in pop], target, max_rate
            )
            llm_answers.append({"kind": kind, "usable": proposed is not None, "reason": reason, "answer": answer[:300]})
            if proposed is not None:
                stats["llm_used"] += 1
                return repair(proposed), f"llm-{kind}"
            stats["llm_fallback"] += 1
            llm_failures[reason] = llm_failures.get(reason, 0) + 1
        return repair(classical(kind, parents)), kind

    uniform = repair([target] * n)
    history: dict = {
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
        **dict(info or {}),
        "generations": [],
        "evaluated": evaluated,
        "stats": stats,
        "llm_failures": llm_failures,
        "llm_answers": llm_answers,
    }

    def save() -> None:
        if history_path is not None:
            write_json(history_path, history)

    pop = [score(uniform, "uniform", 0)]
    history["uniform"] = {"rates": uniform, "fitness": pop[0]["fitness"]}
    seen = {pop[0]["key"]}
    tries = 0
    while len(pop) < population and tries < 20 * population:
        tries += 1
        cand = score(repair([target + init_scale * rng.gauss(0.0, 1.0) for _ in range(n)]), "random", 0)
        if cand["key"] not in seen:
            seen.add(cand["key"])
            pop.append(cand)

    def record(gen: int) -> None:
        pop.sort(key=lambda c: c["fitness"])
        history["generations"].append(
            {
                "generation": gen,
                "best_fitness": pop[0]["fitness"],
                "best_rates": pop[0]["rates"],
                "population": [{"rates": c["rates"], "fitness": c["fitness"], "origin": c["origin"]} for c in pop],
                **{k: stats[k] for k in stats},
            }
        )
        history["best"] = {"rates": pop[0]["rates"], "fitness": pop[0]["fitness"]}
        save()

    record(0)
    bar = tqdm(range(1, generations + 1), desc="self-pruner", unit="gen", disable=not progress)
    for gen in bar:
        children = []
        for _ in range(crossovers):
            a, b = pick(pop), pick(pop)
            rates, origin = operate("crossover", [a["rates"], b["rates"]], pop)
            children.append(score(rates, origin, gen))
        for _ in range(mutations):
            rates, origin = operate("mutation", [pick(pop)["rates"]], pop)
            children.append(score(rates, origin, gen))
        merged = {c["key"]: c for c in children}
        merged.update({c["key"]: c for c in pop})  # a survivor keeps its origin
        pop = sorted(merged.values(), key=lambda c: c["fitness"])[:population]
        record(gen)
        bar.set_postfix(
            best=f"{pop[0]['fitness']:.4g}",
            evals=stats["evaluations"],
            **({"llm": f"{stats['llm_used']}/{stats['llm_proposed']}"} if operator else {}),
        )
    bar.close()
    best = pop[0]
    return SearchResult(
        rates=best["rates"], fitness=best["fitness"], uniform_fitness=history["uniform"]["fitness"], history=history
    )


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
    operator_model: str | None = None,
    operator_options: dict | None = None,
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
    (then ``calibration``/``heldout`` are not used). ``operator_model``: path of a local causal LM used as the
    genetic operator (``operator_options`` for :class:`LLMOperator`). Everything else: see :func:`evolve`.

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
    operator = None
    if operator_model is not None:
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
        max_rate=max_rate,
        mutation_scale=mutation_scale,
        init_scale=init_scale,
        seed=seed,
        progress=progress,
        history_path=history_path,
        info={"criterion": criterion, "granularity": granularity, "criterion_options": dict(criterion_options or {})},
    )
    return result
