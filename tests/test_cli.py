"""`pruning fit --config configs/demo.yaml` end to end on a tiny randomly initialised model (same recipe, fewer
steps): SDM two-stage scoring, pruning, recovery, the report table and an export that stock transformers loads with
the same logits. Also the same config as a 2-node × 1-process torchrun job on localhost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import BYTE_VOCAB, tiny_config_dict
from transformers import AutoModelForCausalLM

from pruning.lightning.cli import lightning_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_config_dict(vocab_size=BYTE_VOCAB)


def tiny_demo_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["model"].pop("pretrained")
    cfg["model"]["config"] = TINY
    cfg["model"]["attn_implementation"] = "eager"
    cfg["data"].update(max_bytes=60_000, val_samples=8, seq_len=32)
    cfg["trainer"]["max_steps"] = 12
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg["trainer"].pop("accumulate_grad_batches", None)
    for cb in cfg["trainer"]["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[1]
        if name == "PruningCallback":
            cb["init_args"]["schedule"]["events"][0]["step"] = 4
            cb["init_args"]["schedule"]["events"][1]["step"] = 8
        elif name == "PruningReport":
            cb["init_args"]["path"] = str(tmp_path / "report.json")
        elif name == "EvaluationCallback":
            cb["init_args"].update(path=str(tmp_path / "eval.json"), limit=8)
        elif name == "ExportOnFitEnd":
            cb["init_args"]["path"] = str(tmp_path / "export")
    path = tmp_path / "demo_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_demo_config_end_to_end(tmp_path, capsys):
    cli = lightning_cli(["fit", "--config", str(tiny_demo_config(tmp_path))])
    rows = json.loads((tmp_path / "report.json").read_text())
    names = [r["model"] for r in rows]
    assert names[0] == "dense" and names[-1] == "recovered"
    assert any(n.startswith("pruned (sdm, mlp_neuron 30%") for n in names)
    assert any(n.startswith("baseline (magnitude") for n in names)
    dense, recovered = rows[0], rows[-1]
    # 30 % of the neurons: 19 of 64 per layer go (uniform width), each 3 × 32 weights
    assert dense["params"] - recovered["params"] == 2 * 19 * 3 * 32
    assert "| dense |" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated  # the evaluation callback's dense / pruned / fit-end numbers
    logged = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text()
    assert "pruning/targeted_sparsity" in logged and "eval/" in logged
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.config.intermediate_size == 64 - 19
    student = cli.model.student.eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)


def test_config_error_names_the_key(tmp_path):
    path = tiny_demo_config(tmp_path)
    with pytest.raises(ValueError, match="alpha=1.5 must be in"):
        lightning_cli(["fit", "--config", str(path), "--model.alpha", "1.5"])


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on localhost")
def test_two_nodes_on_localhost(tmp_path):
    path = tiny_demo_config(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "multinode_local.sh"), str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "report.json").read_text())
    assert rows[-1]["model"] == "recovered"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").config.intermediate_size == 64 - 19


def test_export_holds_the_run_record_and_its_config_runs_it_again(tmp_path):
    """The demo's export records the method, options, schedule, seed, data hashes, evaluation protocol and results
    and the library versions; its saved config, run again, gives the same numbers (issue #14 item 13)."""
    lightning_cli(["fit", "--config", str(tiny_demo_config(tmp_path))])
    export = tmp_path / "export"
    manifest = json.loads((export / "pruning_manifest.json").read_text())
    run = manifest["run"]
    pruning_cb = run["callbacks"]["PruningCallback"]
    assert pruning_cb["options"]["method"] == "sdm" and pruning_cb["options"]["granularity"] == "mlp_neuron"
    assert [e["step"] for e in pruning_cb["events"]] == [4, 8] and pruning_cb["events"][1]["alpha"] == 0.42
    assert pruning_cb["options"]["sparsity_basis"] == "targets" and len(pruning_cb["history"]) == 2
    assert run["seed"] == "0" and run["trainer"]["max_steps"] == 12
    assert len(run["data"]["sha256_all"]) == 64 and len(run["data"]["val"]["sha256"]) == 64
    evaluation = run["callbacks"]["EvaluationCallback"]
    assert evaluation["perplexity_protocol"]["source"] == "stdlib" and set(evaluation["results"]) == {
        "fit_start",
        "after_pruning",
        "fit_end",
    }
    assert run["callbacks"]["PruningReport"]["rows"][-1]["model"] == "recovered"
    versions = manifest["library_versions"]
    assert all(versions[k] for k in ("torch", "transformers", "lightning", "peft", "datasets", "lm_eval"))
    config = export / "pruning_config.yaml"
    assert yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    # made again from its record: the saved config reproduces the evaluation numbers
    lightning_cli(["fit", "--config", str(config)])
    again = json.loads((export / "pruning_manifest.json").read_text())["run"]
    for moment in ("fit_start", "after_pruning", "fit_end"):
        got = again["callbacks"]["EvaluationCallback"]["results"][moment]["perplexity"]["ppl"]
        assert got == evaluation["results"][moment]["perplexity"]["ppl"]
    assert again["data"]["sha256_all"] == run["data"]["sha256_all"]
