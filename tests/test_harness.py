"""lm-eval in-process: the shipped offline task runs on a tiny model held in memory (no network, nothing written for
the model), the results table records which metric each number is, the papers' suite names exist in lm-eval's task
index, and ``pruning eval`` evaluates an export."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from tiny import BYTE_VOCAB, tiny_config_dict, tiny_model
from transformers import PreTrainedModel

import pruning
from pruning.evaluation.harness import (
    DEFAULT_TASKS,
    PAPER_METRIC,
    TASKS_DIR,
    byte_tokenizer,
    evaluate_tasks,
    known_tasks,
    markdown_table,
    result_rows,
)
from pruning.evaluation.tasks import read_jsonl


def byte_model(seed: int = 0):
    return tiny_model("llama", layers=2, seed=seed, vocab_size=256, max_position_embeddings=512)


def _refuse(*args, **kwargs):
    raise AssertionError("nothing may be written for the model")


def go_offline(monkeypatch, tmp_path) -> Path:
    """Offline env vars, no network at all, no model file written, an empty working directory to check."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            ATTEMPTS.append(address)  # recorded: a caller may swallow the error
            raise OSError(f"network access attempted: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _refuse)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    ATTEMPTS.clear()
    return work


ATTEMPTS: list = []


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    return go_offline(monkeypatch, tmp_path)


def test_byte_tokenizer_ids_are_bytes():
    tok = byte_tokenizer()
    text = "def f(x):\n    return 'é' + 'Ā'  # non-ASCII\n"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # no BOS, no EOS, the literal "Ā" is its two bytes
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0 and tok.bos_token_id is None and len(tok) == 256


def test_shipped_task_data():
    rows = read_jsonl(TASKS_DIR / "stdlib_mc" / "stdlib_mc.jsonl")
    assert len(rows) == 100
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
        assert len({len(c) for c in r["choices"]}) == 1  # minimal pairs: one typo each, same length
        assert r["context"].endswith("\n") and r["context"].isascii()
    assert (TASKS_DIR / "stdlib_mc" / "stdlib_mc.yaml").is_file()


def test_lm_eval_in_process_offline(offline):
    model = byte_model()
    model.train()
    rng = torch.random.get_rng_state()
    out = evaluate_tasks(model, None, ["stdlib_mc"], limit=8, batch_size=8, metrics="all")
    accs = {r["metric"]: r["value"] for r in out.rows if r["task"] == "stdlib_mc"}
    assert set(accs) == {"acc", "acc_norm"}
    assert all(0.0 <= v <= 1.0 for v in accs.values())
    assert out.results["n-samples"]["stdlib_mc"]["effective"] == 8
    assert model.training  # restored
    assert torch.equal(torch.random.get_rng_state(), rng)  # lm-eval's seeding does not leak into a training run
    assert list(offline.iterdir()) == []  # nothing written in the working directory
    assert ATTEMPTS == []
    assert json.loads(json.dumps(out.as_dict(), default=str))["rows"]  # JSON-able
    assert "| stdlib_mc | acc |" in out.table()


def test_rows_and_table_record_the_metric():
    raw = {
        "results": {
            "hellaswag": {
                "alias": "hellaswag",
                "acc,none": 0.5,
                "acc_stderr,none": 0.01,
                "acc_norm,none": 0.6,
                "acc_norm_stderr,none": 0.02,
            },
            "boolq": {"alias": "boolq", "acc,none": 0.7, "acc_stderr,none": 0.03},
            "winogrande": {"acc,none": 0.55, "acc_stderr,none": "N/A", "sample_len": 10},
        },
        "n-samples": {"boolq": {"original": 10, "effective": 10}},
    }
    rows = result_rows(raw)
    assert [(r["task"], r["metric"], r["value"]) for r in rows] == [
        ("hellaswag", "acc_norm", 0.6),
        ("boolq", "acc", 0.7),
        ("winogrande", "acc", 0.55),
    ]
    assert rows[1]["n"] == 10 and rows[2]["stderr"] is None
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| task | metric | value | stderr |"
    assert "| hellaswag | acc_norm | 0.6000 | 0.0200 |" in table
    assert "| winogrande | acc | 0.5500 |  |" in table
    assert {r["metric"] for r in result_rows(raw, metrics="all") if r["task"] == "hellaswag"} == {"acc", "acc_norm"}
    assert set(DEFAULT_TASKS) <= set(PAPER_METRIC)


def test_papers_suite_names_exist_in_lm_eval_index():
    """The default suite resolves in lm-eval's own task index (names only: nothing is downloaded)."""
    found = known_tasks([*DEFAULT_TASKS, "stdlib_mc", "no_such_task_xyz"])
    assert all(found[t] for t in DEFAULT_TASKS), found
    assert found["stdlib_mc"] and not found["no_such_task_xyz"]


def test_eval_command_on_an_export(tmp_path, capsys, monkeypatch):
    from pruning.commands.eval import main

    export = tmp_path / "export"
    pruning.save_pretrained(byte_model(seed=1), export, tokenizer=byte_tokenizer())
    offline = go_offline(monkeypatch, tmp_path)
    text = tmp_path / "heldout.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 20)
    out_json = tmp_path / "eval.json"
    before = sorted(os.listdir(export))
    out = main(
        [
            str(export),
            "--perplexity",
            str(text),
            "--seq-len",
            "32",
            "--tasks",
            "stdlib_mc",
            "--limit",
            "4",
            "--json",
            str(out_json),
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert "perplexity " in printed and "| stdlib_mc | acc |" in printed
    saved = json.loads(out_json.read_text())
    assert saved["model"]["kind"] == "export"
    assert saved["perplexity"]["protocol"]["seq_len"] == 32 and saved["perplexity"]["tokenizer"] != "bytes"
    assert saved["perplexity"]["ppl"] == pytest.approx(out["perplexity"]["ppl"])
    assert 0 <= saved["lm_eval"]["rows"][0]["value"] <= 1
    assert sorted(os.listdir(export)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "eval.json", "export", "heldout.txt"]
    assert list(offline.iterdir()) == [] and ATTEMPTS == []


def test_eval_command_on_a_lightning_checkpoint(tmp_path, capsys):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from pruning.commands.eval import main
    from pruning.evaluation.perplexity import evaluate_perplexity
    from pruning.lightning.module import DistillationModule

    cfg = tiny_config_dict(vocab_size=BYTE_VOCAB)
    module = DistillationModule(config=cfg, attn_implementation="eager", lr=1e-2)
    g = torch.Generator().manual_seed(0)
    data = DataLoader([{"input_ids": torch.randint(0, 256, (16,), generator=g)} for _ in range(2)], batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    text = tmp_path / "heldout.txt"
    text.write_text("for i in range(10):\n    print(i)\n" * 10)
    out = main([str(ckpt), "--perplexity", str(text), "--seq-len", "32", "--device", "cpu"])
    want = evaluate_perplexity(module.student, "bytes", {"source": str(text), "seq_len": 32})
    assert out["model"]["kind"] == "lightning_checkpoint"
    assert out["perplexity"]["ppl"] == pytest.approx(want.ppl, rel=1e-5)  # the trained weights, not a fresh init
    assert "perplexity " in capsys.readouterr().out
