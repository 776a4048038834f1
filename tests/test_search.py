"""Self-Pruner's rate search: beats uniform on planted problems (synthetic and a real tiny model), every candidate
meets the mean-rate constraint, fitness is the perplexity of what ``pruning.prune`` builds, the LLM operator path
falls back to classical operators when the model's answers are unusable, and the command lines write their JSON."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import BYTE_VOCAB, calib, tiny_model

import pruning
from pruning.allocation.operators import LLMOperator, parse_rates
from pruning.allocation.search import PrunedPerplexity, evolve, search_rates
from pruning.commands import rank as rank_command
from pruning.commands import search as search_command
from pruning.evaluation.perplexity import perplexity

SENSITIVITY = [20.0, 20.0, 5.0, 1.0, 1.0, 0.2, 0.2, 0.2]


def planted(rates) -> float:
    """Layers 0-1 are 100x more sensitive than layers 5-7: the best allocation is far from uniform."""
    return sum(s * r * r for s, r in zip(SENSITIVITY, rates))


def _check_constraint(history: dict, target: float, max_rate: float) -> None:
    counts = history["counts"]
    assert history["evaluated"], "nothing was evaluated"
    for cand in history["evaluated"]:
        rates = cand["rates"]
        assert sum(rates) / len(rates) == target, cand
        assert all(0 <= r <= max_rate for r in rates), cand
        assert all((r * c).is_integer() for r, c in zip(rates, counts)), cand


def test_search_beats_uniform_on_planted_fitness(tmp_path):
    path = tmp_path / "history.json"
    result = evolve(
        [32] * 8,
        0.25,
        planted,
        population=12,
        generations=15,
        mutations=6,
        crossovers=6,
        seed=0,
        progress=False,
        history_path=path,
        max_rate=0.75,
    )
    assert result.uniform_fitness == pytest.approx(planted([0.25] * 8))
    assert result.fitness < 0.5 * result.uniform_fitness
    assert result.rates[0] < 0.25 < result.rates[7]  # the sensitive layers lose less
    on_disk = json.loads(path.read_text())
    assert on_disk["best"]["fitness"] == result.fitness
    assert len(on_disk["generations"]) == 16 and on_disk["operator"] == "classical"
    _check_constraint(on_disk, 0.25, 0.75)
    stats = on_disk["stats"]
    assert stats["evaluations"] == len(on_disk["evaluated"]) and stats["cache_hits"] > 0
    best = [g["best_fitness"] for g in on_disk["generations"]]
    assert best == sorted(best, reverse=True)  # elitist: never worse


def test_search_rates_with_a_fitness_hook_and_query_heads():
    model = tiny_model("llama", 4)  # 4 query heads in 2 KV groups: rates move in steps of one head per group
    seen = []

    def fitness(rates):
        seen.append(list(rates))
        return sum(s * r * r for s, r in zip([10.0, 1.0, 1.0, 0.1], rates))

    result = search_rates(
        model,
        None,
        None,
        0.25,
        granularity="query_head",
        population=4,
        generations=3,
        mutations=2,
        crossovers=2,
        progress=False,
        max_rate=0.5,
        fitness=fitness,
    )
    assert all(sum(r) / 4 == 0.25 and all(x in (0.0, 0.5) for x in r) for r in seen)
    assert result.fitness < result.uniform_fitness
    assert result.history["granularity"] == "query_head"


def _planted_model():
    """A tiny Llama whose first two layers' MLPs carry the output and whose last two barely matter; held-out text is
    sampled from the model itself, so the dense model fits it well and removing sensitive neurons hurts."""
    model = tiny_model("llama", 4, seed=0)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(8.0 if i < 2 else 0.02)
        model.lm_head.weight.mul_(20.0)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 128, (8, 1), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text = model.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            max_new_tokens=23,
            min_new_tokens=23,
            pad_token_id=0,
        )
    return model, [text[:4], text[4:]]


def test_search_on_a_planted_model_beats_uniform_and_matches_prune():
    model, heldout = _planted_model()
    data = calib(8, seq=24, batch=4)
    fit = PrunedPerplexity(model, data, heldout, "wanda", "mlp_neuron")
    # fitness is the perplexity of the model pruning.prune builds with those rates (dense statistics)
    rates = [0.125, 0.25, 0.5, 0.125]
    pruned = copy.deepcopy(model)
    pruning.prune(
        pruned,
        data,
        "wanda",
        0.25,
        "mlp_neuron",
        allocation="rates",
        layer_rates=rates,
        sequential=False,
        progress=False,
    )
    assert fit(rates) == pytest.approx(perplexity(pruned, heldout), rel=1e-6)
    dense = perplexity(model, heldout)
    assert fit([0.0] * 4) == pytest.approx(dense, rel=1e-6)  # the model is restored after every candidate
    result = search_rates(
        model,
        data,
        heldout,
        0.5,
        "wanda",
        population=8,
        generations=4,
        mutations=4,
        crossovers=4,
        progress=False,
        max_rate=0.9,
    )
    assert result.fitness < result.uniform_fitness
    assert result.rates[0] + result.rates[1] < result.rates[2] + result.rates[3]
    _check_constraint(result.history, 0.5, 0.9)
    assert perplexity(model, heldout) == pytest.approx(dense, rel=1e-6)


# ------------------------------------------------------------------------------------------------ the LLM operator
def test_parse_rates():
    assert parse_rates("new: [0.1, 0.2, .3, 0.4] done", 4) == ([0.1, 0.2, 0.3, 0.4], "ok")
    assert parse_rates("[1, 2] then [0.5,0.5,0.25,0.0]", 4)[0] == [0.5, 0.5, 0.25, 0.0]
    assert parse_rates("[0.1, 0.2]", 4) == (None, "a list of 2 numbers, not 4")
    assert parse_rates("[0.1, 1.2, 0.3, 0.4]", 4) == (None, "rates outside [0, 1)")
    assert parse_rates("0.1 0.2 0.3 0.4", 4) == (None, "no bracketed list of numbers")


def _save_tiny_operator(path) -> None:
    """A random 2-layer Llama and a character-level tokenizer, built offline and saved like any local model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789.,[] \nabcdefghijklmnopqrstuvwxyz:")
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tok.save_pretrained(path)
    ids = dict(eos_token_id=1, bos_token_id=1, pad_token_id=1)
    model = tiny_model("llama", seed=0, attn=None, vocab_size=len(vocab), max_position_embeddings=4096, **ids)
    model.save_pretrained(path)


def test_llm_operator_with_a_tiny_local_model_falls_back(tmp_path):
    _save_tiny_operator(tmp_path / "op")
    result = evolve(
        [16] * 4,
        0.25,
        lambda r: planted(list(r) * 2),
        population=4,
        generations=2,
        mutations=2,
        crossovers=2,
        progress=False,
        operator=LLMOperator(str(tmp_path / "op"), max_new_tokens=24),
        max_rate=0.75,
    )
    stats = result.history["stats"]
    assert stats["llm_proposed"] == 8
    assert stats["llm_used"] + stats["llm_fallback"] == 8
    assert stats["llm_fallback"] >= 6  # a random model writes garbage; the classical operators took over
    assert sum(result.history["llm_failures"].values()) == stats["llm_fallback"]
    assert len(result.history["llm_answers"]) == 8  # the raw answers are kept for inspection
    assert result.history["operator"].endswith("op")
    _check_constraint(result.history, 0.25, 0.75)
    assert result.fitness <= result.uniform_fitness


class ScriptedOperator(LLMOperator):
    """An operator 'model' that answers crossovers with a usable list (off the mean: repaired) and mutations with
    prose; the prompt it receives is kept for inspection."""

    def __init__(self) -> None:
        self.path, self.calls, self.shown, self.prompts = "scripted", 0, 10, []

    def generate(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if "crossover" in prompt:
            return "Sure! The new list is [0.05, 0.1, 0.4, 0.6] which should be better."
        return "I think layer 3 should be pruned more."


def test_llm_answers_are_parsed_validated_and_repaired():
    op = ScriptedOperator()
    result = evolve(
        [16] * 4,
        0.25,
        lambda r: planted(list(r) * 2),
        population=4,
        generations=2,
        mutations=2,
        crossovers=2,
        progress=False,
        operator=op,
        max_rate=0.75,
    )
    stats = result.history["stats"]
    assert stats["llm_used"] == 4 and stats["llm_fallback"] == 4
    assert result.history["llm_failures"] == {"no bracketed list of numbers": 4}
    from_llm = [c for c in result.history["evaluated"] if c["origin"] == "llm-crossover"]
    assert from_llm and from_llm[0]["rates"] != [0.05, 0.1, 0.4, 0.6]  # mean 0.2875 -> repaired to 0.25
    _check_constraint(result.history, 0.25, 0.75)
    prompt = op.prompts[0]
    assert "perplexity" in prompt and "must be 0.2500" in prompt and "[r1, r2, ..., r4]" in prompt


# ------------------------------------------------------------------------------------------------ command lines
def test_search_and_ranking_command_lines(tmp_path, capsys):
    tiny_model("llama", seed=0, attn=None, vocab_size=BYTE_VOCAB, max_position_embeddings=64).save_pretrained(
        tmp_path / "m"
    )
    data = ["--seq-len", "16", "--calibration", "4", "--heldout", "4", "--batch-size", "2"]
    out = tmp_path / "rates.json"
    search_command.main(
        [
            "--model",
            str(tmp_path / "m"),
            "--target",
            "0.25",
            "--population",
            "3",
            "--generations",
            "1",
            "--mutations",
            "1",
            "--crossovers",
            "1",
            "--out",
            str(out),
            *data,
        ]
    )
    written = json.loads(out.read_text())
    assert len(written["layer_rates"]) == 2 and sum(written["layer_rates"]) / 2 == 0.25
    assert json.loads((tmp_path / "rates.history.json").read_text())["generations"]
    assert "layer_rates: [" in capsys.readouterr().out
    out = tmp_path / "saap.json"
    rank_command.main(["--model", str(tmp_path / "m"), "--target", "0.25", "--out", str(out), *data])
    written = json.loads(out.read_text())
    assert sum(written["layer_rates"]) / 2 == 0.25 and len(written["criterion_options"]["sigma"]) == 2
