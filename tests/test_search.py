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
from pruning.allocation.operators import ChatEndpoint, LLMOperator, parse_indices, parse_rate_lists, parse_rates
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
    per_op = stats["llm"]
    # 3 initial slots (the uniform allocation is the 4th member), 8 parent choices (one answer per child: both
    # parents of a crossover at once), 4 crossovers, 4 mutations
    assert {op: s["proposed"] for op, s in per_op.items()} == {
        "initialisation": 3,
        "selection": 8,
        "crossover": 4,
        "mutation": 4,
    }
    assert stats["llm_proposed"] == 19 == stats["llm_used"] + stats["llm_fallback"]
    assert all(s["used"] + s["fallback"] == s["proposed"] for s in per_op.values())
    assert stats["llm_fallback"] >= 15  # a random model writes garbage; the classical operators took over
    assert sum(result.history["llm_failures"].values()) == len(
        [a for a in result.history["llm_answers"] if not a["usable"]]
    )
    assert len(result.history["llm_answers"]) == 17  # one initialisation request, 16 per-child answers
    assert result.history["operator"].endswith("op")
    _check_constraint(result.history, 0.25, 0.75)
    assert result.fitness <= result.uniform_fitness


class Scripted:
    """An operator 'model' that answers each of the four prompts from a script (``None``: prose, unusable) and
    keeps every prompt it received."""

    name = "scripted"

    def __init__(self, init=None, select_crossover=None, select_mutation=None, crossover=None, mutation=None):
        self.answers = {
            "init": init,
            "select-crossover": select_crossover,
            "select-mutation": select_mutation,
            "crossover": crossover,
            "mutation": mutation,
        }
        self.prompts: dict[str, list[str]] = {k: [] for k in self.answers}

    @staticmethod
    def kind(prompt: str) -> str:
        if "initial population" in prompt:
            return "init"
        if "Select two parents" in prompt:
            return "select-crossover"
        if "Select one parent" in prompt:
            return "select-mutation"
        return "crossover" if "by crossover" in prompt else "mutation"

    def generate(self, prompt: str) -> str:
        kind = self.kind(prompt)
        self.prompts[kind].append(prompt)
        return self.answers[kind] or "I think layer 3 should be pruned more."


def _fmt(rates) -> str:
    return "[" + ", ".join(str(r) for r in rates) + "]"


# valid as they are (whole groups of 1/32, mean 0.25, <= 0.75): the repair leaves them unchanged
L1 = [0.125, 0.125, 0.25, 0.25, 0.25, 0.375, 0.375, 0.25]
L2 = [0.0625, 0.125, 0.25, 0.25, 0.3125, 0.3125, 0.375, 0.3125]
CROSS = [0.0, 0.0, 0.125, 0.25, 0.25, 0.5, 0.5, 0.375]  # far better than anything near uniform
MUTANT = [0.0, 0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.5]  # better still


def _scripted_run(model: Scripted, llm_operators, **kw):
    settings = dict(population=6, generations=1, mutations=2, crossovers=2, max_rate=0.75, seed=0) | kw
    op = LLMOperator(model)
    return evolve([32] * 8, 0.25, planted, progress=False, operator=op, llm_operators=llm_operators, **settings)


def test_llm_initialisation_answer_is_the_initial_population():
    model = Scripted(init=f"Here are two:\n{_fmt(L1)}\n{_fmt(L2)}\nand [0.5, 0.5] is too short")
    result = _scripted_run(model, ("initialisation",))
    first = result.history["generations"][0]["population"]
    by_origin = {}
    for c in first:
        by_origin.setdefault(c["origin"], []).append(c["rates"])
    assert sorted(by_origin["llm-init"]) == sorted([L1, L2])  # the model's lists, as written
    assert len(by_origin["uniform"]) == 1 and len(by_origin["random"]) == 3  # the rest filled classically
    assert result.history["stats"]["llm"] == {"initialisation": {"proposed": 5, "used": 2, "fallback": 3}}
    prompt = model.prompts["init"][0]
    assert "5 different pruning-rate lists" in prompt and "must be 0.2500" in prompt and "[r1, ..., r8]" in prompt
    assert not model.prompts["crossover"]  # only the operators named are asked


def test_llm_selection_answer_chooses_the_parents():
    # a mutation scale of 0: the classical mutant is its parent, so the chosen parent is visible in the child
    model = Scripted(select_crossover="Parents: [3, 1]", select_mutation="I pick [4]")
    result = _scripted_run(model, ("selection",), mutation_scale=0.0)
    pop0 = result.history["generations"][0]["population"]  # sorted, best first: the prompt's numbering
    kids = result.history["offspring"]
    assert [k["parents"] for k in kids] == [[3, 1], [3, 1], [4], [4]]
    assert {k["selection"] for k in kids} == {"llm"}
    for k in kids[2:]:
        assert k["rates"] == pop0[4]["rates"]  # the mutant of candidate 4
    for k in kids[:2]:  # each crossover layer comes from parent 3 or parent 1 (then repaired, here a no-op or not)
        assert k["origin"] == "crossover"
    assert result.history["stats"]["llm"]["selection"] == {"proposed": 4, "used": 4, "fallback": 0}
    prompt = model.prompts["select-crossover"][0]
    assert "0: [" in prompt and "5: [" in prompt and "(6 candidates)" in prompt
    # unusable selections fall back to tournaments, counted
    model = Scripted(select_crossover="[3, 3]", select_mutation="[9]")
    result = _scripted_run(model, ("selection",))
    assert result.history["stats"]["llm"]["selection"] == {"proposed": 4, "used": 0, "fallback": 4}
    assert result.history["llm_failures"] == {"the same candidate twice": 2, "indices outside 0..5": 2}
    assert {k["selection"] for k in result.history["offspring"]} == {"tournament"}


def test_llm_crossover_and_mutation_answers_enter_the_population():
    model = Scripted(crossover=f"Sure! The new list is {_fmt(CROSS)}.", mutation=f"Mutated: {_fmt(MUTANT)}")
    result = _scripted_run(model, ("crossover", "mutation"))
    assert result.rates == MUTANT and result.fitness == pytest.approx(planted(MUTANT))
    final = result.history["generations"][-1]["population"]
    assert final[0] == {"rates": MUTANT, "fitness": planted(MUTANT), "origin": "llm-mutation"}
    assert final[1] == {"rates": CROSS, "fitness": planted(CROSS), "origin": "llm-crossover"}
    assert result.history["stats"]["llm"] == {
        "crossover": {"proposed": 2, "used": 2, "fallback": 0},
        "mutation": {"proposed": 2, "used": 2, "fallback": 0},
    }
    prompt = model.prompts["crossover"][0]
    assert "perplexity" in prompt and "must be 0.2500" in prompt and "[r1, r2, ..., r8]" in prompt


def test_llm_answers_are_parsed_validated_and_repaired():
    off_mean = [0.05, 0.1, 0.4, 0.6]  # mean 0.2875: repaired to 0.25
    model = Scripted(crossover=f"Sure! The new list is {_fmt(off_mean)} which should be better.")
    result = evolve(
        [16] * 4,
        0.25,
        lambda r: planted(list(r) * 2),
        population=4,
        generations=2,
        mutations=2,
        crossovers=2,
        progress=False,
        operator=LLMOperator(model),
        llm_operators=("crossover", "mutation"),
        max_rate=0.75,
    )
    stats = result.history["stats"]
    # the same answer every time: in generation 2 its repaired list is already a parent, so it is no answer then
    assert stats["llm_used"] == 2 and stats["llm_fallback"] == 6
    assert result.history["llm_failures"] == {"no bracketed list of numbers": 4, "a copy of a parent": 2}
    from_llm = [c for c in result.history["evaluated"] if c["origin"] == "llm-crossover"]
    assert from_llm and from_llm[0]["rates"] != off_mean
    _check_constraint(result.history, 0.25, 0.75)
    with pytest.raises(ValueError, match=r"\['selection_'\] unknown"):
        evolve([16] * 4, 0.25, planted, operator=LLMOperator(model), llm_operators=("selection_",))


def test_parse_lists_and_indices():
    lists, reason = parse_rate_lists("[0.1, 0.2] [0.1,0.2,0.3] x [0.5, 0.25, 0.0]", 3)
    assert lists == [[0.1, 0.2, 0.3], [0.5, 0.25, 0.0]] and reason == "ok"
    assert parse_rate_lists("[1.5, 0, 0]", 3) == ([], "rates outside [0, 1)")
    assert parse_indices("take [2, 0]", 2, 3) == ([2, 0], "ok")
    assert parse_indices("[2.5, 0]", 2, 3) == (None, "indices outside 0..2")
    assert parse_indices("[1]", 2, 3) == (None, "1 indices, not 2")


# ------------------------------------------------------------------------------------------------ an HTTP endpoint
class _ChatServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (a thread), answering from ``reply(prompt)`` or
    with ``status``; it records every request's path, headers and JSON body. Nothing leaves the machine."""

    def __init__(self, reply, status: int = 200) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if status != 200:
                    self.send_error(status)
                    return
                content = reply(body["messages"][0]["content"])
                out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_chat_endpoint_answers_are_used(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SELF_PRUNER_TEST_KEY", "sk-test")
    scripted = Scripted(mutation=f"Mutated: {_fmt(MUTANT)}")
    with _ChatServer(scripted.generate) as server:
        endpoint = ChatEndpoint(server.url, "tiny-chat", api_key_env="SELF_PRUNER_TEST_KEY", max_tokens=64)
        op = LLMOperator(endpoint)
        result = evolve(
            [32] * 8,
            0.25,
            planted,
            population=4,
            generations=1,
            mutations=1,
            crossovers=1,
            progress=False,
            operator=op,
            llm_operators=("mutation",),
            max_rate=0.75,
        )
    assert result.rates == MUTANT
    assert result.history["stats"]["llm"] == {"mutation": {"proposed": 1, "used": 1, "fallback": 0}}
    assert result.history["operator"] == f"tiny-chat @ {server.url}/chat/completions"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"]["model"] == "tiny-chat" and req["body"]["max_tokens"] == 64
    assert req["body"]["messages"][0]["role"] == "user" and "Mutate the parent" in req["body"]["messages"][0]["content"]


def test_chat_endpoint_failures_fall_back(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with _ChatServer(lambda p: "", status=500) as server:
        op = LLMOperator(ChatEndpoint(server.url + "/chat/completions", "m", timeout=10))
        result = evolve(
            [32] * 8,
            0.25,
            planted,
            population=3,
            generations=1,
            mutations=1,
            crossovers=1,
            progress=False,
            operator=op,
            max_rate=0.75,
        )
    assert len(server.requests) == 1 + 2 + 2  # one initialisation request, two selections, two children
    assert not [r for r in server.requests if r["path"] != "/v1/chat/completions"]
    assert "Authorization" not in server.requests[0]["headers"]  # no key configured, none sent
    stats = result.history["stats"]
    assert stats["llm_used"] == 0 and stats["llm_fallback"] == stats["llm_proposed"] == 2 + 2 + 2
    assert result.history["llm_failures"] == {"endpoint error: HTTP 500": 5}
    with pytest.raises(ValueError, match="must be an http"):
        ChatEndpoint("file:///etc/passwd", "m")
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(ValueError, match="NOT_SET_KEY.*not set"):
        ChatEndpoint("http://127.0.0.1:1/v1", "m", api_key_env="NOT_SET_KEY")


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
    rank_command.main(["--model", str(tmp_path / "m"), "--target", "0.25", "--out", str(out), "--second-order", *data])
    assert json.loads(out.read_text())["criterion_options"]["second_order"] is True


def test_search_command_line_with_an_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    tiny_model("llama", seed=0, attn=None, vocab_size=BYTE_VOCAB, max_position_embeddings=64).save_pretrained(
        tmp_path / "m"
    )
    base = ["--model", str(tmp_path / "m"), "--target", "0.25", "--population", "3", "--generations", "1"]
    base += ["--mutations", "1", "--crossovers", "1", "--seq-len", "16", "--calibration", "4", "--heldout", "4"]
    out = tmp_path / "rates.json"
    with _ChatServer(lambda prompt: "[0.5, 0.0]") as server:
        search_command.main(
            [*base, "--out", str(out), "--operator-endpoint", server.url, "--operator-endpoint-model", "m"]
            + ["--llm-operators", "mutation"]
        )
    history = json.loads((tmp_path / "rates.history.json").read_text())
    assert history["llm_operators"] == ["mutation"] and history["stats"]["llm"]["mutation"]["used"] == 1
    assert [r["body"]["model"] for r in server.requests] == ["m"]
    with pytest.raises(SystemExit, match="needs --operator-endpoint-model"):
        search_command.main([*base, "--operator-endpoint", "http://127.0.0.1:1/v1"])


# ------------------------------------------------------------------------------------------------ review fixes
def test_answers_restating_their_inputs_are_read_at_the_end():
    # chat models restate the parents or the candidates before the answer: the last usable list is the answer
    assert parse_rates("Combining [0.1, 0.2] and [0.3, 0.4] gives [0.2, 0.3].", 2) == ([0.2, 0.3], "ok")
    assert parse_indices("Candidates [0, 1] look good; I choose [2, 3]", 2, 5) == ([2, 3], "ok")
    assert parse_indices("[2, 3] and then [1]", 2, 5) == ([2, 3], "ok")


def test_a_child_that_copies_its_parent_is_not_counted_as_used():
    class Echo(Scripted):
        def generate(self, prompt: str) -> str:  # answers with the parent it was shown (the line before the ask)
            return "Here: " + prompt.split("Mutate the parent ")[1].split(" into")[0]

    with pytest.warns(UserWarning, match="usable answer 0 times out of 2"):
        result = _scripted_run(Echo(), ("mutation",))
    assert result.history["stats"]["llm"]["mutation"] == {"proposed": 2, "used": 0, "fallback": 2}
    assert result.history["llm_failures"] == {"a copy of a parent": 2}
    assert {k["origin"] for k in result.history["offspring"] if k["generation"] == 1} >= {"mutation"}


def test_history_keeps_each_generations_own_counts():
    model = Scripted(mutation=f"Mutated: {_fmt(MUTANT)}")
    result = _scripted_run(model, ("mutation",), generations=2)
    counts = [g["llm"]["mutation"]["proposed"] for g in result.history["generations"]]
    assert counts == [0, 2, 4]


def test_the_operator_is_told_how_long_an_answer_is():
    class Budgeted(Scripted):
        answer_budget = 0
        seen: list[int] = []

        def generate(self, prompt: str) -> str:
            self.seen.append(self.answer_budget)
            return super().generate(prompt)

    model = Budgeted(mutation=f"Mutated: {_fmt(MUTANT)}")
    _scripted_run(model, ("initialisation", "mutation"))
    from pruning.allocation.operators import answer_tokens

    # 5 lists of 8 rates for the initial population, then one list per mutation
    assert model.seen == [answer_tokens(5, 8), answer_tokens(1, 8), answer_tokens(1, 8)]
    assert answer_tokens(10, 80) > 10 * 80 * 7  # 80 layers, byte-level tokens: "0.250, " is 7 bytes


def test_chat_endpoint_refuses_redirects_trickles_and_plain_http_keys(monkeypatch):
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SELF_PRUNER_TEST_KEY", "sk-secret")
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen.append(dict(self.headers))
            self.rfile.read(int(self.headers["Content-Length"]))
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/elsewhere")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(40):  # a byte every 0.1 s: each read is quick, the whole never ends in time
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        from pruning.allocation.operators import OperatorModelError

        redirected = ChatEndpoint(base + "/redirect/v1", "m", api_key_env="SELF_PRUNER_TEST_KEY")
        with pytest.raises(OperatorModelError, match="redirect refused"):
            redirected.generate("hi")
        assert len(seen) == 1  # the key went to the configured server only
        t0 = time.monotonic()
        with pytest.raises(OperatorModelError, match="not complete within 1 s"):
            ChatEndpoint(base + "/v1", "m", timeout=1).generate("hi")
        assert time.monotonic() - t0 < 3
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(ValueError, match="unencrypted"):
        ChatEndpoint("http://example.org/v1", "m", api_key_env="SELF_PRUNER_TEST_KEY")
    with pytest.raises(ValueError, match="timeout=0 must be > 0"):
        ChatEndpoint(base + "/v1", "m", timeout=0)
    assert ChatEndpoint("https://h.example/v1?token=abc", "m").name == "m @ https://h.example/v1/chat/completions"


def test_search_command_checks_operator_flags_before_loading(tmp_path):
    from pruning.commands import search as cmd

    missing = str(tmp_path / "no-such-model")  # never loaded: the flags are refused first
    with pytest.raises(SystemExit, match=r"--llm-operators 'mutaton': unknown \['mutaton'\]"):
        cmd.main(["--model", missing, "--target", "0.25", "--operator-model", "x", "--llm-operators", "mutaton"])
    with pytest.raises(SystemExit, match="--operator-endpoint-model without --operator-endpoint"):
        cmd.main(["--model", missing, "--target", "0.25", "--operator-endpoint-model", "m"])


def test_local_operator_refuses_an_answer_longer_than_its_context(tmp_path):
    _save_tiny_operator(tmp_path / "op")
    with pytest.raises(ValueError, match="max_new_tokens=4096 must be between 1 and the model's context"):
        LLMOperator(str(tmp_path / "op"), max_new_tokens=4096)
