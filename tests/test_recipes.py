"""Every recipe in configs/ runs as written, and says what it does.

- At the real scale (the published shapes of the models the recipes name, built on the meta device: no weights, no
  download), each event of a recipe keeps the widths its comments claim (e.g. SDMPrune's stage A: 7987 of 8192).
- End to end: each recipe runs through ``pruning fit`` with its model replaced by a tiny one of the same family,
  its data by a small local file (bytes), its steps scaled down (events scaled with them) and its outputs in a
  temporary directory: every scheduled event fires, the callbacks it lists run, and the export loads with the
  trained model's logits. The two-command recipes (SAAP's ranking, Self-Pruner's search) run their first command too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny import BYTE_VOCAB, tiny_config_dict, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

import pruning
from pruning.commands.demo import demo_config
from pruning.lightning.cli import lightning_cli
from pruning.options import SelectionOptions
from pruning.pipeline import Pruner
from pruning.pipeline.event import event_options
from pruning.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))

LLAMA_3_2_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, tie_word_embeddings=True,
)  # fmt: skip
LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, tie_word_embeddings=False,
)  # fmt: skip
REAL = {
    "meta-llama/Llama-3.2-1B": LLAMA_3_2_1B,
    "meta-llama/Llama-2-7b-hf": LLAMA_7B,
    "huggyllama/llama-7b": LLAMA_7B,
    ".cache/demo-model": demo_config().to_dict(),
}
# what the comments of each recipe promise: MLP neurons kept per layer after each event, at the real scale
KEPT = {
    "demo": [500, 359],
    "sdm_llama3.2-1b": [7987, 4421],
    "fsdp_llama3.2-1b": [7987, 4421],
    "mutual_info_llama3.2-1b": [6554],
    "taylor_llama3.2-1b": [6554],
}


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())


def _pruning_callback(cfg: dict) -> dict | None:
    for cb in cfg["trainer"].get("callbacks", []):
        if cb["class_path"].endswith("PruningCallback"):
            return cb["init_args"]
    return None


def test_every_recipe_opens_with_its_command():
    for name in RECIPES:
        first = (ROOT / "configs" / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith(f"# pruning fit --config configs/{name}.yaml"), name


@pytest.mark.parametrize("name", sorted(KEPT))
def test_kept_widths_at_the_real_scale_match_the_comments(name):
    cfg = _recipe(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**REAL[cfg["model"]["pretrained"]]))
    init = dict(_pruning_callback(cfg))
    schedule = Schedule(**init.pop("schedule"))
    selection = SelectionOptions(method=init.pop("criterion"), granularity=init.pop("granularity"), **init)
    kept = []
    for event in schedule.plan():
        pruner = Pruner(model, event_options(selection, event))
        count = pruner.targets.group_sets[0].count
        kept.append(count - int(math.floor(pruner.fraction * count + 1e-9)))
    assert kept == KEPT[name]
    text = (ROOT / "configs" / f"{name}.yaml").read_text()
    for k in kept:
        assert re.search(rf"\b{k}\b", text), f"{name}: the comments do not state the {k} kept"


# ---------------------------------------------------------------------------------------------- end to end
TINY = tiny_config_dict(vocab_size=BYTE_VOCAB, max_position_embeddings=512)
STEPS = 8


def _scale(step: int, factor: float, low: int) -> int:
    return max(low, min(STEPS, round(step / factor)))


def _scaled_schedule(schedule: dict, factor: float, low: int) -> dict:
    s = dict(schedule)
    if s.get("kind") == "cubic":
        s.update(start_step=_scale(s.get("start_step", 0), factor, 0), end_step=_scale(s["end_step"], factor, 1))
        s["every"] = max(1, round(s.get("every", 1) / factor))
    elif s.get("kind") == "steps":
        steps, last = [], low - 1
        for e in s["events"]:
            last = max(last + 1, _scale(e["step"], factor, low))
            steps.append({**e, "step": last})
        s["events"] = steps
    else:
        s["step"] = _scale(s.get("step", 0), factor, low)
    return s


def _write_data(tmp: Path, instruct: bool) -> Path:
    from pruning.text import stdlib_files

    path = tmp / ("instruct.jsonl" if instruct else "text.jsonl")
    texts = [f.read_text(encoding="utf-8", errors="replace")[:1500] for f in stdlib_files("train")[:60]]
    rows = (
        [{"instruction": f"Continue: {t[:40]}", "output": t[40:400]} for t in texts]
        if instruct
        else [{"text": t} for t in texts]
    )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _first_commands(name: str, cfg: dict, tmp: Path, model_dir: Path, data: Path) -> None:
    """The recipes' first command (SAAP's ranking, Self-Pruner's search) on the tiny model, writing its rates_file."""
    init = _pruning_callback(cfg)
    if not init or "rates_file" not in init:
        return
    out = tmp / "rates.json"
    text = ["--text", str(data), "--tokenizer", "bytes"] if False else []  # noqa: SIM108 (bytes: the default)
    common = ["--model", str(model_dir), "--target", str(init["schedule"]["sparsity"]), "--seq-len", "32"]
    common += ["--calibration", "8", "--heldout", "4", "--batch-size", "2", "--out", str(out), *text]
    if "saap" in name:
        from pruning.commands.rank import main as rank

        rank(common)
    else:
        from pruning.commands.search import main as search

        search(common + ["--population", "3", "--generations", "1", "--mutations", "1", "--crossovers", "1"])
    init["rates_file"] = str(out)


def _tiny_recipe(name: str, tmp: Path) -> tuple[Path, dict]:
    cfg = _recipe(name)
    model_dir = tmp / "tiny-model"
    tiny_model("llama", layers=2, seed=0, vocab_size=BYTE_VOCAB, max_position_embeddings=512).save_pretrained(model_dir)
    model = cfg["model"]
    if name == "recover_lora":  # recovers an export: the tiny model saved stands for it
        model["pretrained"] = str(model_dir)
    else:
        model.pop("pretrained", None)
        model["config"] = dict(TINY)
    model.update(dtype="float32", attn_implementation="eager")
    instruct = cfg["data"].get("mode") == "instruct"
    source = _write_data(tmp, instruct)
    data = cfg["data"]
    # Alpaca's prompt alone is ~190 bytes: instruct examples need longer sequences to keep a response
    data.update(source=str(source), tokenizer="bytes", seq_len=384 if instruct else 32, streaming=False, val_samples=4)
    data.pop("dataset_config", None)
    if data.get("num_samples"):
        data["num_samples"] = 16
    tr = cfg["trainer"]
    factor = tr.get("max_steps", STEPS) / STEPS
    tr.update(accelerator="cpu", devices=1, precision="32-true", default_root_dir=str(tmp / "run"), logger=False)
    tr.pop("num_nodes", None)
    if isinstance(tr.get("strategy"), dict):  # FSDP2 on one CPU process (gloo)
        tr["strategy"]["init_args"].update(data_parallel_size=1, save_distributed_checkpoint=False)
    else:
        tr.pop("strategy", None)
    if "max_steps" in tr:
        tr["max_steps"] = STEPS
    else:  # epochs (LoRA recovery): 16 examples, 4 per optimiser step
        data["num_samples"] = 16
    for cb in tr.get("callbacks", []):
        args = cb.setdefault("init_args", {})
        kind = cb["class_path"].rsplit(".", 1)[1]
        if kind == "PruningCallback":
            stats = args["criterion"] not in ("magnitude",)
            args["schedule"] = _scaled_schedule(args["schedule"], factor, 1 if stats else 0)
        elif kind == "ImportanceCallback" and args.get("window"):
            args["window"] = max(1, round(args["window"] / factor))
        elif kind == "GroupFinetuneCallback":
            args.update(groups=2, steps_per_group=2, start_step=_scale(args.get("start_step", 0), factor, 0))
        elif kind == "ExportOnFitEnd":
            args["path"] = str(tmp / "export")
        elif kind in ("PruningReport", "EvaluationCallback"):
            args["path"] = str(tmp / f"{kind}.json")
            if kind == "EvaluationCallback":
                args.update(limit=4, perplexity={"preset": "stdlib", "seq_len": 32, "max_windows": 4})
    _first_commands(name, cfg, tmp, model_dir, source)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_end_to_end(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, cfg = _tiny_recipe(name, tmp_path)
    try:
        cli = lightning_cli(["fit", "--config", str(path)])
    finally:  # the FSDP recipe's one-process group: other tests expect none
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    callbacks = {type(c).__name__: c for c in cli.trainer.callbacks}
    listed = {cb["class_path"].rsplit(".", 1)[1] for cb in cfg["trainer"].get("callbacks", [])}
    assert listed <= set(callbacks)
    init = _pruning_callback(cfg)
    if init is not None:  # every scheduled event fired, at its step
        pc = callbacks["PruningCallback"]
        assert [h["step"] for h in pc.history] == [e.step for e in Schedule(**init["schedule"]).plan()]
        assert pc.history[-1]["targeted"] > 0
    if "GroupFinetuneCallback" in listed:
        assert callbacks["GroupFinetuneCallback"].layer_groups == [[0], [1]]
    if "PruningReport" in listed:
        rows = json.loads((tmp_path / "PruningReport.json").read_text())
        assert [r["model"].split(" ")[0] for r in rows] == ["dense", "pruned", "baseline", "recovered"]
    if "EvaluationCallback" in listed:
        assert json.loads((tmp_path / "EvaluationCallback.json").read_text())["results"]
    if "ExportOnFitEnd" in listed:  # the export loads, with the trained (compacted, merged) model's logits
        exported = pruning.load_pretrained(tmp_path / "export").eval()
        ids = torch.randint(0, BYTE_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = cli.model.student.eval()(input_ids=ids).logits
            torch.testing.assert_close(exported(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        assert not any(".base_layer." in n or "lora_" in n for n, _ in exported.named_parameters())


def test_gblm_authors_weighting_by_name():
    """``alpha: authors`` is the authors' 100·√N against raw norms, N the per-sequence gradients the statistics hold."""
    data = [torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    got = pruning.prune(tiny_model("llama"), data, "gblm", criterion_options={"alpha": "authors"}, progress=False)
    want = pruning.prune(tiny_model("llama"), data, "gblm", criterion_options={"alpha": 200.0}, progress=False)
    assert all(torch.equal(got.masks.element[n], want.masks.element[n]) for n in want.masks.element)
    other = pruning.prune(tiny_model("llama"), data, "gblm", criterion_options={"alpha": 0.0}, progress=False)
    assert any(not torch.equal(other.masks.element[n], want.masks.element[n]) for n in want.masks.element)
    with pytest.raises(ValueError, match=r"gblm alpha='paper' must be a number >= 0 or 'authors'"):
        pruning.get_criterion("gblm", alpha="paper")
