"""Every one-shot recipe in configs/oneshot/ runs through ``pruning prune --config``, shrunk: its model replaced by a
tiny Llama saved to a temporary directory, its calibration by a small local text file read as bytes (8 windows of
32), its outputs in the temporary directory (the two-command recipes run their first command, ``pruning rank`` or
``pruning search``, too). The result equals :func:`pruning.prune` called with the same recipe's options on windows
made here: identical masks, the same calibration sha256, and an export that loads (model and tokenizer) with the
logits of the model pruned in Python. Also: the Python form (``pruning.prune_recipe``) and the recipe's messages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny import BYTE_VOCAB, tiny_model

import pruning
from pruning.commands import run as pruning_main
from pruning.recipe import Recipe
from pruning.text import Encoder, TextReader, batches, packed_stream, stdlib_files, windows

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs" / "oneshot").glob("*.yaml"))
SEEDS = {"sdm", "gblm", "saap", "self_pruner", "mutual_info", "sparsegpt", "wanda", "taylor", "magnitude"}


def _text(tmp: Path) -> Path:
    path = tmp / "calibration.txt"
    path.write_text("\n\n".join(f.read_text(encoding="utf-8", errors="replace")[:2000] for f in stdlib_files()[:20]))
    return path


def _first_command(cfg: dict, model_dir: Path, text: Path, tmp: Path) -> None:
    """SAAP's ranking or Self-Pruner's search on the tiny model, writing the recipe's rates_file."""
    prune = cfg["prune"]
    if "rates_file" not in prune:
        return
    out = tmp / "rates.json"
    common = ["--model", str(model_dir), "--target", str(prune["sparsity"]), "--granularity", prune["granularity"]]
    common += ["--seq-len", "32", "--calibration", "8", "--heldout", "4", "--batch-size", "2", "--out", str(out)]
    if prune["method"] == "saap":
        pruning_main(["rank", *common])
    else:
        pruning_main(["search", *common, "--criterion", prune["method"], "--population", "3", "--generations", "1",
                      "--mutations", "1", "--crossovers", "1"])  # fmt: skip
    prune["rates_file"] = str(out)


def shrunk(name: str, tmp: Path) -> tuple[Path, dict]:
    """The recipe on a tiny model and a local text file, its outputs under ``tmp``."""
    cfg = yaml.safe_load((ROOT / "configs" / "oneshot" / f"{name}.yaml").read_text())
    model_dir = tmp / "tiny-model"
    tiny_model("llama", layers=2, seed=0, vocab_size=BYTE_VOCAB, max_position_embeddings=512).save_pretrained(model_dir)
    text = _text(tmp)
    cfg["model"] = {"path": str(model_dir), "dtype": "float32", "attn_implementation": "eager"}
    cfg["calibration"] = {"source": str(text), "tokenizer": "bytes", "num_samples": 8, "seq_len": 32,
                          "batch_size": 2, "seed": 0}  # fmt: skip
    cfg["output"] = {"path": str(tmp / "export")}
    cfg["evaluation"] = {"perplexity": str(text), "perplexity_options": {"seq_len": 32, "max_windows": 4}}
    cfg["progress"] = False
    _first_command(cfg, model_dir, text, tmp)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg


def _calibration_here(text: Path) -> list[torch.Tensor]:
    """The recipe's calibration, made without it: the file's byte stream (8 × 8 × 32 tokens), seeded windows."""
    stream = packed_stream(TextReader(str(text)).documents(), Encoder(None), 8 * 8 * 32)
    return list(batches(windows(torch.from_numpy(stream), 32, 8, seed=0), 2))


def _prune_in_python(cfg: dict) -> tuple[torch.nn.Module, list]:
    model = pruning.load_pretrained(cfg["model"]["path"]).eval()
    calib = _calibration_here(Path(cfg["calibration"]["source"]))
    options = pruning.PruneOptions(**cfg["prune"])
    events = [options, *(dataclasses.replace(options, **e) for e in cfg.get("events", []))]
    keep = any(o.alpha > 0 for o in events)
    results, masks = [], None
    for opts in events:
        results.append(pruning.prune(model, calib, options=opts, masks=masks, keep_original=keep, progress=False))
        masks = results[-1].masks
    return model, results


def test_every_seed_method_has_a_recipe():
    assert {name.split("_llama")[0] for name in RECIPES if name != "demo"} == SEEDS


def test_every_recipe_opens_with_its_command():
    for name in RECIPES:
        first = (ROOT / "configs" / "oneshot" / f"{name}.yaml").read_text().splitlines()[0]
        assert first == f"# pruning prune --config configs/oneshot/{name}.yaml", name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_as_written(name):
    """The file as shipped parses into a Recipe (no download: nothing is loaded)."""
    recipe = Recipe.load(ROOT / "configs" / "oneshot" / f"{name}.yaml")
    method = {"self_pruner": "wanda", "demo": "wanda"}.get(name.split("_llama")[0], name.split("_llama")[0])
    assert recipe.output.path and recipe.options()[0].method == method


# what the comments of each recipe promise: MLP neurons kept per layer after each event, at the real scale
KEPT = {"demo": [359], "sdm_llama3.2-1b": [7987, 4421], "taylor_llama3.2-1b": [6554], "mutual_info_llama3.2-1b": [6554]}


@pytest.mark.parametrize("name", sorted(KEPT))
def test_kept_widths_at_the_real_scale_match_the_comments(name):
    """Each event of the recipe on the published shapes of its model (meta device: no weights, no download)."""
    from test_recipes import REAL
    from transformers import AutoModelForCausalLM, LlamaConfig

    recipe = Recipe.load(ROOT / "configs" / "oneshot" / f"{name}.yaml")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**REAL[recipe.model.path]))
    kept = []
    for opts in recipe.options():
        pruner = pruning.Pruner(model, opts)
        count = pruner.targets.group_sets[0].count
        kept.append(count - int(math.floor(pruner.fraction * count + 1e-9)))
    assert kept == KEPT[name]
    text = (ROOT / "configs" / "oneshot" / f"{name}.yaml").read_text()
    for k in kept:
        assert re.search(rf"\b{k}\b", text), f"{name}: the comments do not state the {k} kept"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_and_equals_pruning_prune(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path, cfg = shrunk(name, tmp_path)
    got = pruning_main(["prune", "--config", str(path)])
    out = capsys.readouterr().out
    assert "perplexity " in out and f"wrote {tmp_path / 'export'}" in out
    model, want = _prune_in_python(cfg)
    assert len(got.events) == len(want)
    for a, b in zip(got.events, want):
        assert a.masks.element.keys() == b.masks.element.keys() and a.masks.groups.keys() == b.masks.groups.keys()
        assert all(torch.equal(a.masks.element[k], b.masks.element[k]) for k in b.masks.element)
        assert all(torch.equal(a.masks.groups[k], b.masks.groups[k]) for k in b.masks.groups)
    assert got.masks.groups or got.masks.element
    manifest = json.loads((tmp_path / "export" / "pruning_manifest.json").read_text())
    here = pruning.calibration_fingerprint(_calibration_here(tmp_path / "calibration.txt"))
    assert manifest["calibration"]["sha256"] == here["sha256"] == got.calibration["sha256"]
    assert manifest["recipe"]["prune"]["method"] == cfg["prune"]["method"] and len(manifest["events"]) == len(want)
    if want[-1].masks.groups:
        pruning.compact(model, want[-1].masks)
    exported = pruning.load_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, BYTE_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "export")("ab")["input_ids"] == [97, 98]


def test_python_form_is_the_same_code_path(tmp_path, monkeypatch):
    """``pruning.prune_recipe(path)`` and ``Recipe.load(path).run()`` give the command's masks; ``--key value``
    overrides apply as on the command line."""
    monkeypatch.chdir(tmp_path)
    path, _ = shrunk("wanda_llama3.2-1b", tmp_path)
    cli = pruning_main(["prune", "--config", str(path), "--output.path", str(tmp_path / "a")])
    py = pruning.prune_recipe(path, ["--output.path", str(tmp_path / "b")])
    assert all(torch.equal(cli.masks.element[k], py.masks.element[k]) for k in cli.masks.element)
    sixty = Recipe.load(path, ["--prune.sparsity", "0.6", "--evaluation", "null", "--output.path", "null"]).run()
    assert sixty.export is None and not sixty.evaluation
    assert abs(sixty.events[-1].report.targeted.fraction - 0.6) < 0.02


def test_print_config_shows_every_field(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        pruning_main(["prune", "--config", str(ROOT / "configs/oneshot/wanda_llama3.2-1b.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["prune"]["method"] == "wanda" and printed["calibration"]["num_samples"] == 128
    assert {"model", "calibration", "prune", "events", "output", "evaluation"} <= set(printed)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--prune.method", "sdm"], r"method='sdm' does not support granularity='unstructured'"),
        (["--prune.sparsity", "1.5"], r"sparsity=1.5 must be in \[0, 1\)"),
        (["--events", "[{sparsity: 0.6, bogus: 1}]"], r"events\[0\] has unknown key\(s\) \['bogus'\]"),
        (["--calibration.num_samples", "0"], r"calibration.num_samples=0 must be >= 1"),
        (["--calibration.source", "missing/*.txt"], r"no file matches `source`='missing/\*.txt'"),
        (["--prune.sparsity", "half"], r"^error: prune.sparsity: Expected a <class 'float'>"),
        (["--calibration.seq_lenn", "32"], r"^error: unrecognized arguments: --calibration.seq_lenn 32"),
    ],
)
def test_bad_values_are_one_line(args, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path, _ = shrunk("wanda_llama3.2-1b", tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        pruning_main(["prune", "--config", str(path), *args])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(match, err[0]), err[0]


def test_python_form_raises_instead_of_exiting(tmp_path):
    path, _ = shrunk("wanda_llama3.2-1b", tmp_path)
    with pytest.raises(ValueError, match=r"sparsity=1.5 must be in \[0, 1\)"):
        Recipe.load(path, ["--prune.sparsity", "1.5"])
    with pytest.raises(Exception, match=r"prune.sparsity"):  # jsonargparse's ArgumentError, not SystemExit
        Recipe.load(path, ["--prune.sparsity", "half"])
