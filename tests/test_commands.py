"""The ``pruning`` console script in one style (issue #18): ``pruning --help`` lists every subcommand with one line;
every subcommand takes ``--config FILE`` and ``--print_config`` (jsonargparse), and a config printed by one run gives
the same run; printed names say what was measured; normal runs print no warnings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import BYTE_VOCAB, tiny_model

import pruning
from pruning.commands import COMMANDS, run
from pruning.text.tokens import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EVERY = ["fit", "validate", "test", "prune", "eval", "search", "rank", "demo", "demo-model"]


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A tiny byte-level model saved as an export, with its tokenizer."""
    model = tiny_model("llama", layers=2, seed=0, vocab_size=BYTE_VOCAB, max_position_embeddings=512)
    return pruning.save_pretrained(model, tmp_path / "export", tokenizer=byte_tokenizer())


def test_help_lists_every_command_in_one_line(capsys):
    run(["--help"])
    out = capsys.readouterr().out
    assert list(COMMANDS) == EVERY
    for name in EVERY:
        lines = [line for line in out.splitlines() if line.strip().split(" ")[0] == name]
        assert len(lines) == 1 and len(lines[0].split(name, 1)[1].strip()) > 20, (name, out)
    run([])  # no command: the same listing
    assert capsys.readouterr().out == out


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        run(["prnue", "--config", "x.yaml"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown command 'prnue'; allowed: " + ", ".join(EVERY) + ". HINT: pruning --help"
    )


@pytest.mark.parametrize("name", ["fit", "prune", "eval", "search", "rank", "demo", "demo-model"])
def test_every_command_takes_config_and_print_config(name, capsys):
    with pytest.raises(SystemExit) as done:
        run([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: pruning {name}" in out or name == "fit", out[:300]
    assert "--config CONFIG" in out and "--print_config" in out


def test_a_printed_config_runs_the_same(export, tmp_path, capsys, monkeypatch):
    """``pruning eval ... --print_config`` gives YAML; ``pruning eval --config`` of it measures the same thing."""
    monkeypatch.chdir(tmp_path)
    flags = [str(export), "--perplexity", "stdlib", "--seq-len", "32", "--max-windows", "4", "--device", "cpu"]
    direct = run(["eval", *flags])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(["eval", *flags, "--print_config"])
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["seq_len"] == 32 and cfg["model"] == str(export) and cfg["perplexity"] == "stdlib"
    (tmp_path / "eval.yaml").write_text(printed)
    again = run(["eval", "--config", str(tmp_path / "eval.yaml")])
    assert again["perplexity"]["ppl"] == direct["perplexity"]["ppl"]
    assert again["perplexity"]["protocol"] == direct["perplexity"]["protocol"]


def test_rank_and_search_take_a_config(export, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(export), "--target", "0.25", "--seq-len", "32", "--calibration", "8", "--heldout", "4"]
    common += ["--batch-size", "2"]
    (tmp_path / "rank.yaml").write_text(yaml.safe_dump({"out": str(tmp_path / "r.json"), "skip_layers": [0]}))
    run(["rank", "--config", str(tmp_path / "rank.yaml"), *common])
    rates = yaml.safe_load((tmp_path / "r.json").read_text())["layer_rates"]
    assert rates[0] == 0.0 and rates[1] > 0
    assert f"wrote {tmp_path / 'r.json'} (SAAP's σ and layer rates" in capsys.readouterr().err


def test_search_says_its_perplexity_is_on_the_search_split(export, tmp_path, capsys, monkeypatch):
    """The fitness of the search is measured on the end of the calibration stream, not on held-out text: the printed
    name says so (``pruning eval`` gives the held-out number)."""
    monkeypatch.chdir(tmp_path)
    args = ["search", "--model", str(export), "--target", "0.25", "--seq-len", "32", "--calibration", "8"]
    args += ["--heldout", "4", "--batch-size", "2", "--population", "3", "--generations", "1", "--mutations", "1"]
    run([*args, "--crossovers", "1", "--out", str(tmp_path / "s.json")])
    line = next(x for x in capsys.readouterr().out.splitlines() if "ppl" in x)
    assert line.startswith("best search-split ppl ") and "held-out ppl" not in line
    assert "4 windows of the last 10% of the calibration text, not a held-out test set" in line
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["fitness_measured_on"].startswith("search split: 4 windows of the last 10%")


def _console(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PRUNING_VERBOSE_ERRORS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pruning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # progress bars (tqdm's \r-separated updates) are output too, but no line of them says "warn"
    return proc.stdout + proc.stderr


SPURIOUS = re.compile(r"(?i)\bwarn(ing|ings|ed)?\b|deprecat|💡|\btip\b|fatal:|Traceback")


@pytest.mark.multiprocess  # starts the console script
def test_normal_runs_print_no_warnings(export, tmp_path):
    """``pruning prune``, ``pruning eval`` (lm-eval included) and ``pruning fit`` on tiny stand-ins, outside any git
    clone: nothing in their output is a warning, a tip or a complaint."""
    recipe = {
        "model": {"path": str(export)},
        "calibration": {"source": "stdlib", "tokenizer": "bytes", "num_samples": 4, "seq_len": 32, "max_bytes": 50000},
        "prune": {"method": "wanda", "granularity": "mlp_neuron", "sparsity": 0.25},
        "output": {"path": str(tmp_path / "pruned")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    outputs = [_console(["prune", "--config", "recipe.yaml"], tmp_path)]
    outputs.append(
        _console(
            [
                "eval",
                "pruned",
                "--perplexity",
                "stdlib",
                "--max-windows",
                "2",
                "--tasks",
                "stdlib_mc",
                "--limit",
                "2",
                "--device",
                "cpu",
            ],
            tmp_path,
        )  # fmt: skip
    )
    from test_cli import tiny_demo_config

    outputs.append(_console(["fit", "--config", str(tiny_demo_config(tmp_path))], tmp_path))
    for out in outputs:
        bad = [line for line in out.splitlines() if SPURIOUS.search(line)]
        assert not bad, bad


def test_test_without_a_test_step_is_one_line(tmp_path, capsys):
    """``pruning test`` over the DistillationModule (no test loop) says so in one line, with what to run instead."""
    from test_cli import tiny_demo_config

    with pytest.raises(SystemExit) as done:
        run(["test", "--config", str(tiny_demo_config(tmp_path))])
    assert done.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "error: No `test_step()` method defined to run `Trainer.test`. HINT: `pruning validate --config ...` "
        "measures the held-out perplexity"
    )
