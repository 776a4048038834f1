"""The quality benchmark end to end in miniature (tiny reference model, few samples), so that it cannot rot."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
import reference_model as refm  # noqa: E402
import run_all  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    preset = dataclasses.replace(refm.PRESETS["tiny"], steps=6, max_train_bytes=60_000, max_heldout_bytes=20_000)
    cache = tmp_path_factory.mktemp("ref")
    ref = refm.load_or_train(preset, cache, name="tiny", log=lambda *_: None)
    return ref, preset, cache


def test_reference_model_manifest_and_cache(tiny_ref):
    ref, preset, cache = tiny_ref
    m = ref.manifest
    assert m["steps"] == 6 and m["tokens_seen"] == 6 * preset.batch * preset.seq_len
    assert m["config"]["num_key_value_heads"] < m["config"]["num_attention_heads"]  # GQA
    assert m["tokenizer"]["sha256"] == refm.tokenizer_sha256(ref.tokenizer)
    assert math.isfinite(m["heldout_ppl"]) and m["heldout_ppl"] > 1
    assert json.loads((cache / "tiny" / "manifest.json").read_text())["key"] == m["key"]
    again = refm.load_or_train(preset, cache, name="tiny", log=lambda *_: None)  # cached: same weights
    for (n, a), (_, b) in zip(ref.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(again.heldout_ids, ref.heldout_ids)
    # the tokenizer saw the train split only, and the streams decode back to text
    assert ref.tokenizer.decode(ref.heldout_ids[:50].tolist())


def test_quality_benchmark_miniature(tiny_ref, tmp_path):
    ref, _, _ = tiny_ref
    settings = [s for s in quality.SETTINGS if s.key in ("unstructured50", "mlp30")]
    labels = ("wanda", "wanda (sum)", "sparsegpt", "sparsegpt (per row)", "taylor", "sdm", "saap + ranking")
    labels += ("self-pruner (classical)", "self-pruner (LLM operators)", "saap (joint)", "mutual_info (random pairs)")
    methods = [m for m in quality.METHODS if m.label in labels]
    res = quality.run(
        ref,
        settings=settings,
        methods=methods,
        calibration=4,
        calib_batch=2,
        eval_windows=4,
        recovery_steps=2,
        recovery_batch=2,
        search_windows=2,
        search={"population": 3, "generations": 1, "mutations": 1, "crossovers": 1},
        operator="scripted",
        out=tmp_path,
        log=lambda *_: None,
    )
    rows = {(r["setting"], r["method"]): r for r in res["rows"]}
    # sdm, saap + ranking and the search are structured only: no unstructured cell; every other cell ran. The other
    # forms run only where they differ from the default: wanda's sum on groups, sparsegpt per row unstructured
    assert set(rows) == {
        ("dense", "dense"),
        ("unstructured50", "wanda"),
        ("unstructured50", "sparsegpt"),
        ("unstructured50", "sparsegpt (per row)"),
        ("unstructured50", "taylor"),
        ("mlp30", "wanda"),
        ("mlp30", "wanda (sum)"),
        ("mlp30", "taylor"),
        ("mlp30", "sdm"),
        ("mlp30", "saap + ranking"),
        ("mlp30", "self-pruner (classical)"),
        ("mlp30", "self-pruner (LLM operators)"),
        ("mlp30", "saap (joint)"),
        ("mlp30", "mutual_info (random pairs)"),
    }
    # the non-uniform rows: one rate per layer, the mean rate of the uniform rows (whole neurons, rounded down per
    # layer: the nonzero counts below are equal); the search scored candidates on its own split
    n_layers, width = ref.model.config.num_hidden_layers, ref.model.config.intermediate_size
    for label in ("saap + ranking", "self-pruner (classical)", "self-pruner (LLM operators)"):
        rates = rows[("mlp30", label)]["layer_rates"]
        assert len(rates) == n_layers and sum(rates) / n_layers == pytest.approx(int(0.3 * width) / width)
    search = rows[("mlp30", "self-pruner (classical)")]
    assert rows[("unstructured50", "sparsegpt")]["scope"] == "layer"
    assert (
        rows[("unstructured50", "sparsegpt (per row)")]["scope"] == rows[("unstructured50", "wanda")]["scope"] == "row"
    )
    assert rows[("mlp30", "wanda (sum)")]["options"] == {"structured": "sum"}
    assert rows[("mlp30", "wanda")]["mask_sha256"] != rows[("mlp30", "wanda (sum)")]["mask_sha256"]
    assert search["search_evaluations"] >= 2 and search["search_fitness"] <= search["search_uniform_fitness"]
    llm = rows[("mlp30", "self-pruner (LLM operators)")]["search_llm"]  # the scripted operator answers usably
    assert set(llm) == {"initialisation", "selection", "crossover", "mutation"}
    # every answer parses; on a model this small a classical child can equal its parent, which is not counted
    assert all(c["proposed"] == c["used"] + c["fallback"] > 0 for c in llm.values()), llm
    assert llm["crossover"]["used"] + llm["mutation"]["used"] > 0, llm
    assert llm["initialisation"]["used"] == llm["initialisation"]["proposed"]
    assert llm["selection"]["used"] == llm["selection"]["proposed"]
    assert res["protocol"]["self_pruner_operator"]["model"].startswith("scripted")
    joint = rows[("mlp30", "saap (joint)")]
    assert set(joint["joint_kept"]) == {f"{k}.{i}" for k in ("mlp_neuron", "attention_head") for i in range(n_layers)}
    assert "mi_removable" in rows[("mlp30", "mutual_info (random pairs)")]
    assert res["protocol"]["search"]["sha256"] != res["protocol"]["eval"]["sha256"]
    # mask fingerprints: wanda's cell and the search's cell are different models unless the search kept uniform
    assert all(len(r["mask_sha256"]) == 64 for r in res["rows"] if r["method"] != "dense")
    for r in res["rows"]:
        assert math.isfinite(r["ppl_before"]) and math.isfinite(r["ppl_after"])
    # equal sparsity for every method of a setting; the same calibration data everywhere
    own_budget = ("saap (joint)", "mutual_info (random pairs)")  # the joint budget, and MI's threshold floor
    for key in ("unstructured50", "mlp30"):
        assert (
            len({r["nonzero_params"] for r in res["rows"] if r["setting"] == key and r["method"] not in own_budget})
            == 1
        )
    hidden = ref.model.config.hidden_size
    assert 0 <= joint["nonzero_params"] - rows[("mlp30", "wanda")]["nonzero_params"] < n_layers * 3 * hidden
    assert rows[("mlp30", "mutual_info (random pairs)")]["nonzero_params"] >= rows[("mlp30", "wanda")]["nonzero_params"]
    assert rows[("unstructured50", "wanda")]["nonzero_params"] < rows[("dense", "dense")]["nonzero_params"]
    fp = res["protocol"]["calibration"]["sha256"]
    assert {r["calibration_sha256"] for r in res["rows"] if r["method"] != "dense"} == {fp}
    # outputs
    md = (tmp_path / "quality.md").read_text()
    assert "| wanda |" in md and "| wanda (sum) |" in md and "–" in md and "Head to head" in md
    assert "## Non-uniform allocations" in md and "self-pruner (classical), mlp30: rates [" in md
    assert "operator answers used: initialisation" in md and "saap (joint), mlp30: KV groups kept per layer" in md
    assert "Wanda-sp (down_proj / o_proj columns, default) vs Wanda summed" in md
    assert (tmp_path / "quality_unstructured.png").stat().st_size > 1000
    assert (tmp_path / "quality_mlp.png").stat().st_size > 1000
    assert json.loads((tmp_path / "quality.json").read_text())["rows"][0]["method"] == "dense"
    snippet = (tmp_path / "quality_table.md").read_text()
    assert snippet.startswith("| method |") and "docs/quality_mlp.png" in snippet


def test_shared_gradients_equal_prune_own(tiny_ref):
    """The benchmark's one shared gradient pass gives the masks each prune call would compute alone."""
    import copy

    import pruning
    import pruning.text.stdlib

    ref, preset, _ = tiny_ref
    calib = [pruning.text.windows(ref.train_ids, preset.seq_len, 4, seed=0)]
    shared = quality.shared_gradients(ref.model, calib, {"mlp_neuron"})
    for method, gran, opts in (("taylor", "mlp_neuron", {"mode": "vector"}), ("gblm", "unstructured", {})):
        a, b = copy.deepcopy(ref.model), copy.deepcopy(ref.model)
        ra = pruning.prune(a, calib, method, 0.5, gran, criterion_options=opts, progress=False)
        rb = pruning.prune(b, calib, method, 0.5, gran, criterion_options=opts, gradients=shared, progress=False)
        for n in ra.masks.names():
            pa, pb = a.get_parameter(n), b.get_parameter(n)
            assert torch.equal(ra.masks.keep_mask(n, pa), rb.masks.keep_mask(n, pb)), (method, n)


def test_replace_between_markers():
    text = "intro\n<!-- quality:begin -->\nold\n<!-- quality:end -->\ntail\n"
    out = run_all.replace_between_markers(text, "quality", "| a |\n|---|")
    assert out == "intro\n<!-- quality:begin -->\n| a |\n|---|\n<!-- quality:end -->\ntail\n"
    assert run_all.replace_between_markers(out, "quality", "| a |\n|---|") == out  # idempotent
    with pytest.raises(KeyError):
        run_all.replace_between_markers(text, "speed", "x")
