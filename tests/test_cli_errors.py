"""Bad inputs through the command line (issue #14): exit code 2, no traceback, nothing trained, and the last line of
the output is the one naming the key or file to fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from test_cli import tiny_demo_config

BAD = {  # case: (changes to the tiny demo recipe, the actionable line that must end the output)
    "typo in a choice": ({"model": {"teacher": "liftd"}}, r"error: model.teacher: Expected .*Got value: liftd"),
    "typo in model.config": (
        {"model": {"config": {"num_hiden_layers": 3}}},
        r"error: model.config.num_hiden_layers=3 is not a field of LlamaConfig \(did you mean 'num_hidden_layers'\?\)",
    ),
    "missing pretrained path": (
        {"model": {"pretrained": "./no/such/model", "config": None}},
        r"error: model.pretrained='./no/such/model': no such directory",
    ),
    "bad callback key": (
        {"pruning": {"granularity": "mlp_neurons"}},
        r"error: trainer.callbacks \(PruningCallback.granularity\): Expected .*Got value: mlp_neurons",
    ),
    "event temperature 0": (
        {"pruning": {"schedule": {"kind": "steps", "events": [{"step": 4, "sparsity": 0.1, "temperature": 0}]}}},
        r"error: schedule: temperature=0.0 at step 4 must be > 0",
    ),
    "event after max_steps": (
        {"pruning": {"schedule": {"kind": "one_shot", "step": 40, "sparsity": 0.3, "events": None}}},
        r"error: schedule: the event at step 40 .* last optimiser step 12",
    ),
    "missing data file": ({"data": {"source": "./nope.jsonl"}}, r"error: TextDataModule: source='./nope.jsonl'"),
    "data not UTF-8": ({"data": {"source": "latin1.txt"}}, r"error: .*latin1.txt' is not UTF-8 text"),
}


def _apply(cfg: dict, changes: dict) -> None:
    for section, values in changes.items():
        if section == "pruning":
            target = next(
                c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("PruningCallback")
            )
        else:
            target = cfg[section]
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(target.get(k), dict):
                target[k].update(v)
            elif v is None:
                target.pop(k, None)
            else:
                target[k] = v


@pytest.mark.multiprocess  # each case starts the console script
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_before_training_with_one_line(case, tmp_path):
    changes, last_line = BAD[case]
    path = tiny_demo_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    _apply(cfg, changes)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("PRUNING_VERBOSE_ERRORS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pruning", "fit", "--config", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    import re

    assert re.match(last_line, out.splitlines()[-1]), out[-3000:]
    assert not (tmp_path / "export").exists() and not (tmp_path / "report.json").exists()  # nothing trained
