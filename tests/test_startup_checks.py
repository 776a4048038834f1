"""No silent damage: bad input is refused before any training step, with one message naming the key or file to fix
(issue #14). Each test fails on the code before the check it covers."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from tiny import BYTE_VOCAB, calib, tiny_config_dict, tiny_model
from torch.utils.data import DataLoader

import pruning
from pruning.callbacks import ImportanceCallback, PruningCallback
from pruning.datamodules import TextDataModule
from pruning.lightning import DistillationModule
from pruning.schedule import Event, Schedule


class Steps(pl.Callback):
    """Counts the training batches that started (a check must fail before the first)."""

    def __init__(self) -> None:
        self.started = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started += 1


def _fit(module, callbacks, data=None, **trainer_kw) -> Steps:
    steps = Steps()
    kw = dict(max_steps=6) | trainer_kw
    tr = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[steps, *callbacks], **kw,
    )  # fmt: skip
    data = data or DataLoader([{"input_ids": torch.randint(0, 128, (16,))} for _ in range(8)], batch_size=1)
    tr.fit(module, data)
    return steps


def _module(**kw) -> DistillationModule:
    return DistillationModule(config=tiny_config_dict(), attn_implementation="eager", **kw)


# ------------------------------------------------------------------------------ 2. events the run never reaches
@pytest.mark.parametrize(
    "schedule, trainer_kw, match",
    [
        (Schedule(step=9, sparsity=0.3), {}, r"the event at step 9 .*last optimiser step 6"),
        (Schedule(kind="steps", events=[Event(2, 0.1), Event(7, 0.3)]), {}, r"step 7 .*last optimiser step 6"),
        (Schedule(kind="cubic", sparsity=0.5, end_step=8, every=2), {}, r"schedule.end_step at step 8"),
        # no max_steps: 2 epochs of 8 micro-batches, 4 per optimiser step: 4 steps
        (Schedule(step=5, sparsity=0.3), dict(max_steps=-1, max_epochs=2, accumulate_grad_batches=4), r"step 4 "),
    ],
)
def test_unreachable_events_are_refused_before_training(schedule, trainer_kw, match):
    steps = Steps()
    with pytest.raises(ValueError, match=match + r".*HINT"):
        steps = _fit(_module(), [PruningCallback("magnitude", "mlp_neuron", schedule)], **trainer_kw)
    assert steps.started == 0


def test_an_event_at_the_last_step_fires():
    pc = PruningCallback("magnitude", "mlp_neuron", Schedule(step=6, sparsity=0.3))
    _fit(_module(), [pc])
    assert [h["step"] for h in pc.history] == [6]


# ------------------------------------------------------------------------------ 3. per-event α and τ
@pytest.mark.parametrize(
    "event, match",
    [
        ({"step": 4, "sparsity": 0.3, "temperature": 0}, r"temperature=0 at step 4 must be > 0"),
        ({"step": 4, "sparsity": 0.3, "temperature": -1}, r"temperature=-1 at step 4 must be > 0"),
        ({"step": 4, "sparsity": 0.3, "alpha": 1.5}, r"alpha=1.5 at step 4 must be in \[0, 1\]"),
    ],
)
def test_event_loss_is_checked_when_the_schedule_is_built(event, match):
    with pytest.raises(ValueError, match=match):
        Schedule(kind="steps", events=[{"step": 2, "sparsity": 0.1}, event])


# ------------------------------------------------------------------------------ 4. rows without the text field
def test_rows_without_text_are_refused_or_counted(tmp_path):
    path = tmp_path / "half.jsonl"
    rows = [{"text": f"document number {i} " * 8} if i % 2 else {"id": i} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = TextDataModule(source=str(path), seq_len=16, batch_size=1, val_samples=0)
    with pytest.raises(ValueError, match=r"text_field='text'.*a row has no 'text'.*missing_text: skip"):
        data.setup("fit")
    data = TextDataModule(source=str(path), seq_len=16, batch_size=1, val_samples=0, missing_text="skip")
    data.setup("fit")
    assert data.record["rows_without_text_skipped"] == 20


# ------------------------------------------------------------------------------ 5. typos in model.config
def test_typo_in_model_config_is_refused():
    cfg = tiny_config_dict(num_hiden_layers=3)
    with pytest.raises(ValueError, match=r"model.config.num_hiden_layers=3 is not a field of LlamaConfig "
                                         r"\(did you mean 'num_hidden_layers'\?\)"):  # fmt: skip
        DistillationModule(config=cfg)
    # keys the config class consumes are fine (transformers' own legacy spellings)
    DistillationModule(config=tiny_config_dict(rope_theta=5e5))


# ------------------------------------------------------------------------------ 6. pruning twice without masks=
def test_pruning_twice_without_masks_continues_and_holds():
    model = tiny_model("llama", layers=2, seed=3)
    data = calib(n=4, seq=16)
    first = pruning.prune(model, data, "magnitude", 0.3, progress=False)
    zero_before = {n: p.detach() == 0 for n, p in model.named_parameters() if n in first.masks.element}
    second = pruning.prune(model, data, "wanda", 0.5, progress=False)  # no masks=
    assert second.report.targeted.fraction == pytest.approx(0.5)  # cumulative, not 0.5 on top of 0.3 nor 0.2
    assert set(second.info["continued_from_zeros"]) == set(first.masks.element)
    second.masks.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(input_ids=data[0], labels=data[0]).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, zero in zero_before.items():
        assert bool((model.get_parameter(n)[zero] == 0).all()), n  # the first call's zeros did not revive


# ------------------------------------------------------------------------------ 7. LoRA settings from a config dict
def test_lora_from_a_config_dict_merges_at_fit_end():
    m = _module(lora={"r": 2, "merge_at_end": True})  # LightningCLI hands the module a dict
    pc = PruningCallback("magnitude", "mlp_neuron", Schedule(step=0, sparsity=0.3))
    _fit(m, [pc], max_steps=3)
    assert not hasattr(m.student, "peft_config")  # merged and unwrapped
    with pytest.raises(ValueError, match=r"model.lora has unknown keys \['rank'\]"):
        _module(lora={"rank": 2})


# ------------------------------------------------------------------------------ 8. global heads keep one per layer
def test_global_attention_heads_keep_one_group_per_layer():
    model = tiny_model("llama", layers=2, seed=0)
    with torch.no_grad():  # layer 1's attention scores far below layer 0's: a global ranking would empty it
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(model.model.layers[1].self_attn, name).weight.mul_(1e-3)
    res = pruning.prune(model, None, "magnitude", 0.5, "attention_head", allocation="global", progress=False)
    assert res.info["kept_groups_per_layer"][1] >= 1 and sum(res.info["kept_groups_per_layer"].values()) == 2
    pruning.compact(model, res.masks)  # exportable


# ------------------------------------------------------------------------------ 9. N:M widths
def test_nm_on_a_width_not_divisible_is_refused_before_scoring():
    model = tiny_model("llama", layers=1, intermediate_size=66)  # down_proj has 66 input columns
    with pytest.raises(ValueError, match=r"granularity='4:8'.*model.layers.0.mlp.down_proj.weight has 66"):
        pruning.prune(model, calib(), "wanda", granularity="4:8", progress=False)
    m = DistillationModule(config=tiny_config_dict(layers=1, intermediate_size=66), attn_implementation="eager")
    steps = Steps()
    with pytest.raises(ValueError, match=r"down_proj.weight has 66"):
        steps = _fit(m, [ImportanceCallback(), PruningCallback("wanda", "4:8", Schedule(step=2, sparsity=0.5))])
    assert steps.started == 0


# ------------------------------------------------------------------------------ 12. per-layer export as pretrained
def test_per_layer_export_loads_as_the_module_pretrained(tmp_path):
    model = tiny_model("llama", layers=2, seed=1)
    res = pruning.prune(model, None, "magnitude", 0.3, "mlp_neuron", allocation="global", progress=False)
    pruning.compact(model, res.masks)
    assert model.config.is_heterogeneous
    pruning.save_pretrained(model, tmp_path / "export")
    m = DistillationModule(pretrained=str(tmp_path / "export"), attn_implementation="eager")
    ids = calib(n=2, seq=12)[0]
    with torch.no_grad():
        torch.testing.assert_close(m.student(input_ids=ids).logits, model(input_ids=ids).logits)
    _fit(m, [], max_steps=2)  # and it trains (recovery in a second run)


# ------------------------------------------------------------------------------ 14. clear errors
@pytest.mark.parametrize(
    "calibration, error, match",
    [
        ([[1, 2, 3]], TypeError, r"calibration\[0\] is a list; calibration is an iterable of token-id tensors"),
        ([torch.zeros(2, 3, 4, dtype=torch.long)], TypeError, r"calibration\[0\] is a 3-D tensor"),
        ([torch.full((1, 8), 500)], ValueError, r"token ids in \[500, 500\], outside the model's vocabulary of 128"),
        ([torch.zeros(1, 200, dtype=torch.long)], ValueError, r"200 tokens; the model's position table holds 128"),
    ],
)
def test_bad_calibration_gives_one_message(calibration, error, match):
    with pytest.raises(error, match=match):
        pruning.prune(tiny_model("llama"), calibration, "wanda", progress=False)


def test_non_utf8_text_names_the_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine text " * 20)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 " * 20)
    data = TextDataModule(source=str(tmp_path), seq_len=8, val_samples=0)
    with pytest.raises(ValueError, match=r"bad.txt' is not UTF-8 text .*encoding_errors: replace"):
        data.setup("fit")


def test_non_string_text_column_is_named(tmp_path):
    path = tmp_path / "ints.jsonl"
    path.write_text("\n".join(json.dumps({"text": i, "body": "x" * 40}) for i in range(10)))
    data = TextDataModule(source=str(path), seq_len=8, val_samples=0)
    with pytest.raises(ValueError, match=r"'text' holds int values .*point `text_field` at the text column"):
        data.setup("fit")


def test_model_without_decoder_layers():
    with pytest.raises(pruning.UnsupportedModelError, match=r"no decoder layers.*num_hidden_layers"):
        pruning.prune(tiny_model("llama", layers=0), None, "magnitude", progress=False)


@pytest.mark.parametrize("path", ["./no/such/model", "/definitely/not/here", "out/runs/missing/export"])
def test_missing_pretrained_path(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"model.pretrained=.*no such directory \(relative to .*HINT"):
        DistillationModule(pretrained=path)


def test_hub_name_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"neither a local directory .* nor a model the Hugging Face hub could give"):
        DistillationModule(pretrained="nobody/no-such-model")


def test_data_vocabulary_and_length_against_the_model():
    m = _module()  # vocabulary 128, 128 positions
    data = TextDataModule(source="stdlib", tokenizer="bytes", seq_len=16, batch_size=1, val_samples=0)
    with pytest.raises(ValueError, match=r"data.tokenizer gives ids up to 255.*vocabulary of 128"):
        _fit(m, [], data)
    m = DistillationModule(config=tiny_config_dict(vocab_size=BYTE_VOCAB), attn_implementation="eager")
    data = TextDataModule(source="stdlib", tokenizer="bytes", seq_len=256, batch_size=1, val_samples=0)
    with pytest.raises(ValueError, match=r"data.seq_len=256 .*max_position_embeddings=128"):
        _fit(m, [], data)


# ------------------------------------------------------------------------------ 16. interrupted exports
def test_stale_temporaries_of_an_interrupted_export_are_cleaned(tmp_path):
    model = tiny_model("llama")
    target = tmp_path / "export"
    pruning.save_pretrained(model, target)
    stale = tmp_path / ".export.tmp-killed"  # what a process killed mid-write left (up to a model's size)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    pruning.save_pretrained(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_swap_interrupted_between_renames_keeps_an_export_at_the_path(tmp_path, monkeypatch):
    """Without an atomic exchange the swap is two renames; a kill between them left no export at the path. The
    previous one, moved aside, is put back by the next load or export."""
    import pruning.surgery.export as export

    model = tiny_model("llama")
    target = tmp_path / "export"
    pruning.save_pretrained(model, target, manifest={"run": 1})
    monkeypatch.setattr(export, "exchange", lambda a, b: False)  # a system without renameat2
    real = export.os.rename
    calls = []

    def killed_after_first(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between moving the old export aside and the new one in
        real(src, dst)

    monkeypatch.setattr(export.os, "rename", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        pruning.save_pretrained(model, target, manifest={"run": 2})
    monkeypatch.setattr(export.os, "rename", real)
    # what is at the path: the old export, put back right away (the handler) or, had the process died, by recovery
    assert json.loads((target / "pruning_manifest.json").read_text())["run"] == 1
    aside = tmp_path / ".export.old-x"
    aside.mkdir()
    real(target, aside / "export")  # as a kill -9 between the renames leaves it: nothing at the path
    assert pruning.load_pretrained(target) is not None  # the load puts the previous export back first
    assert json.loads((target / "pruning_manifest.json").read_text())["run"] == 1
    pruning.save_pretrained(model, target, manifest={"run": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_the_swap_is_atomic_and_the_export_world_readable(tmp_path):
    import os
    import stat

    from pruning.surgery.export import exchange

    model = tiny_model("llama")
    target = tmp_path / "export"
    pruning.save_pretrained(model, target, manifest={"run": 1})
    pruning.save_pretrained(model, target, manifest={"run": 2})
    assert json.loads((target / "pruning_manifest.json").read_text())["run"] == 2
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    assert exchange(a, b) and (b / "x").exists() and not (a / "x").exists()  # Linux: one atomic step
