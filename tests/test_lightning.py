"""The Lightning layer against the core: statistics gathered during training steps equal the one-shot path, scoring
steps change no weight, masks hold through recovery (AdamW, accumulation, bf16, LoRA merges), a resumed run equals
an uninterrupted one, a user's own LightningModule works, and bad set-ups fail with a clear message."""

from __future__ import annotations

import contextlib
import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from tiny import tiny_config_dict, tiny_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import pruning
from pruning import get_criterion
from pruning.callbacks import ExportOnFitEnd, ImportanceCallback, PruningCallback
from pruning.lightning.module import DistillationModule, LoraSettings
from pruning.pipeline import collect_gradients
from pruning.schedule import Event, Schedule
from pruning.stats import ActivationCollector, GradientCollector
from pruning.structure import ModelStructure, named_parameters

CFG = tiny_config_dict()
SEQ = 16
TWO_STAGE = [Event(4, 0.1), Event(8, 0.3, alpha=0.42, temperature=0.5)]  # SDMPrune: CE, then distillation


# ---------------------------------------------------------------------------------------------------- helpers
def sequences(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (SEQ,), generator=g) for _ in range(n)]


SEQS = sequences(64)


def samples(seqs) -> list[dict]:
    return [{"input_ids": s} for s in seqs]


def loader(seqs=SEQS, batch_size: int = 1) -> DataLoader:
    return DataLoader(samples(seqs), batch_size=batch_size, shuffle=False)


def calibration(seqs) -> list[torch.Tensor]:
    """The same sequences as the core's calibration list: one [1, seq] tensor each."""
    return [s.unsqueeze(0) for s in seqs]


def trainer(max_steps: int, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def module(**kw) -> DistillationModule:
    kw.setdefault("attn_implementation", "eager")
    kw.setdefault("config", CFG)
    return DistillationModule(**kw)


class Recording(ImportanceCallback):
    """An ImportanceCallback that keeps a copy of the statistics each event is scored from; it scores on frozen
    weights unless told otherwise (as the recipes do), so that the reference model is the one it scores."""

    def __init__(self, *args, **kw) -> None:
        kw.setdefault("freeze_weights", True)
        super().__init__(*args, **kw)
        self.snapshots: list[dict] = []

    def collected(self, lazy: bool = False):
        out = super().collected(lazy)
        # lazily reduced row-sharded statistics (FSDP2, one layer at a time) are recorded whole, as one process has them
        with self.gradients.whole(self.gradients.stats) if self.gradients is not None else contextlib.nullcontext():
            self.snapshots.append(copy.deepcopy(self.state_dict()))
        return out


def assert_same_stats(got: dict, want: dict, path: str = "") -> None:
    assert set(got) == set(want), path
    for k in want:
        if isinstance(want[k], dict):
            assert_same_stats(got[k], want[k], f"{path}{k}/")
        elif torch.is_tensor(want[k]):
            # statistics of a random tiny model are small (~1e-4): the tolerance is relative to the tensor's scale
            atol = 1e-6 * float(want[k].abs().max()) if want[k].numel() else 0.0
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol, msg=f"{path}{k}")
        else:
            assert got[k] == want[k], path + k


def assert_same_masks(got: pruning.MaskSet, want: pruning.MaskSet) -> None:
    assert set(got.groups) == set(want.groups) and set(got.element) == set(want.element)
    for k in want.groups:
        assert torch.equal(got.groups[k], want.groups[k]), k
    for k in want.element:
        assert torch.equal(got.element[k], want.element[k]), k


def assert_pruned_zero(model, masks: pruning.MaskSet) -> int:
    """Every masked entry is exactly 0; returns how many entries are masked."""
    params = named_parameters(model)
    pruned = 0
    for name in masks.names():
        p = params[name]
        keep = masks.keep_mask(name, p)
        assert torch.count_nonzero(p.detach()[~keep]) == 0, name
        pruned += int((~keep).sum())
    assert pruned > 0
    return pruned


def reference_grads(model, criterion: str, granularity: str, seqs, **kw) -> dict:
    """The core's per-sequence gradient statistics by the reference protocol (one backward per sequence, model in
    eval mode)."""
    crit = get_criterion(criterion)
    s = ModelStructure(model)
    sets = s.group_sets(granularity) if granularity != "unstructured" else []
    targets = sorted({m.name for gs in sets for m in gs.members}) if sets else [n + ".weight" for n in s.targets()]
    names = targets if crit.grad_kinds else []  # what Pruner.gradient_collector reads
    group_sets = sets if crit.group_kinds else []
    coll = GradientCollector(model, names, crit.grad_kinds or ("sum",), group_sets, crit.group_kinds or ("coupled",))
    collect_gradients(model, calibration(seqs), coll, progress=False, batched=False, **kw)
    return coll.state_dict()


def reference_acts(model, seqs) -> dict:
    coll = ActivationCollector(ModelStructure(model).targets()).attach()
    with torch.no_grad():
        for ids in calibration(seqs):
            model(input_ids=ids, use_cache=False)
    coll.detach()
    return coll.state_dict()


def prune_core(model, seqs, method, sparsity, granularity, **kw):
    return pruning.prune(model, calibration(seqs), method, sparsity, granularity, progress=False, **kw)


# ---------------------------------------------------------------------------------------------------- 1. = core
def test_sdm_one_shot_equals_core():
    m = module(lr=1e-2)
    ref_model = copy.deepcopy(m.student).eval()
    ic, pc = Recording(), PruningCallback("sdm", "mlp_neuron", Schedule(step=4, sparsity=0.25))
    trainer(5, [ic, pc]).fit(m, loader())
    assert m.student.training  # Lightning trained in train mode; the core scores in eval mode (no dropout here)
    assert pc.history[0]["step"] == 4 and pc.history[0]["micro_batches_scored_on_rank"] == 4

    want = reference_grads(ref_model, "sdm", "mlp_neuron", SEQS[:4])
    assert_same_stats(ic.snapshots[0]["gradients"], want)
    assert want["mlp_neuron.0"]["count"] == 4 and want["mlp_neuron.0"]["sums"]["coupled"].abs().sum() > 0
    res = prune_core(ref_model, SEQS[:4], "sdm", 0.25, "mlp_neuron")
    assert_same_masks(pc.masks, res.masks)
    # the comparison is not vacuous: other sequences give other statistics
    other = reference_grads(ref_model, "sdm", "mlp_neuron", SEQS[4:8])
    assert not torch.allclose(other["mlp_neuron.1"]["sums"]["coupled"], want["mlp_neuron.1"]["sums"]["coupled"])


def test_sdm_two_stage_equals_core():
    m = module(lr=1e-2)
    ref_model = copy.deepcopy(m.student).eval()
    ic, pc = Recording(), PruningCallback("sdm", "mlp_neuron", Schedule(kind="steps", events=TWO_STAGE))
    trainer(9, [ic, pc]).fit(m, loader())
    assert [h["step"] for h in pc.history] == [4, 8]
    assert (m.alpha, m.temperature) == (0.0, 1.0)  # the event's loss held for its scoring steps only

    a = prune_core(ref_model, SEQS[:4], "sdm", 0.1, "mlp_neuron", keep_original=True)
    first = copy.deepcopy(a.masks.groups)
    # stage 2: distillation against the original (masks lifted), as the core computes it
    want = reference_grads(ref_model, "sdm", "mlp_neuron", SEQS[4:8], alpha=0.42, temperature=0.5, masks=a.masks)
    b = prune_core(
        ref_model, SEQS[4:8], "sdm", 0.3, "mlp_neuron", masks=a.masks, alpha=0.42, temperature=0.5, keep_original=True
    )
    assert_same_stats(ic.snapshots[1]["gradients"], want)
    assert_same_masks(pc.masks, b.masks)
    # stage 2 changed more than stage 1's masks, and the distillation loss mattered: CE scores differ
    assert any(not torch.equal(first[k], b.masks.groups[k]) for k in first)
    ce = reference_grads(ref_model, "sdm", "mlp_neuron", SEQS[4:8])
    assert not torch.allclose(ce["mlp_neuron.0"]["sums"]["coupled"], want["mlp_neuron.0"]["sums"]["coupled"])


def test_wanda_event_equals_core_non_sequential():
    m = module(lr=1e-2)
    ref_model = copy.deepcopy(m.student).eval()
    ic, pc = Recording(), PruningCallback("wanda", "unstructured", Schedule(step=4, sparsity=0.5))
    trainer(5, [ic, pc]).fit(m, loader())
    want = reference_acts(copy.deepcopy(ref_model), SEQS[:4])
    assert want["model.layers.0.mlp.up_proj"]["count"] == 4 * SEQ  # tokens
    assert_same_stats(ic.snapshots[0]["activations"], want)
    res = prune_core(ref_model, SEQS[:4], "wanda", 0.5, "unstructured", sequential=False)
    assert_same_masks(pc.masks, res.masks)
    assert len(pc.masks.element) == 14


def test_gradient_accumulation_sees_micro_batch_gradients():
    """accumulate_grad_batches=2: an event at optimiser step 2 scores the same 4 sequences one by one, each with the
    gradient of its own loss (Lightning divides the loss by 2 before backward: undone)."""
    m = module(lr=1e-2)
    ref_model = copy.deepcopy(m.student).eval()
    ic, pc = Recording(), PruningCallback("sdm", "mlp_neuron", Schedule(step=2, sparsity=0.25))
    trainer(3, [ic, pc], accumulate_grad_batches=2).fit(m, loader())
    assert pc.history[0]["micro_batches_scored_on_rank"] == 4
    want = reference_grads(ref_model, "sdm", "mlp_neuron", SEQS[:4])
    assert_same_stats(ic.snapshots[0]["gradients"], want)  # per sequence, not the accumulated .grad
    assert_same_masks(pc.masks, prune_core(ref_model, SEQS[:4], "sdm", 0.25, "mlp_neuron").masks)


def test_gradient_checkpointing_counts_each_token_once():
    """With gradient checkpointing the layers' forwards run again inside backward: not new tokens (GBLM mixes the
    activation norm with the gradient term, so a doubled Σx² would change its scores)."""
    snapshots = []
    for checkpointing in (False, True):
        m = module(lr=1e-2, gradient_checkpointing=checkpointing)
        ic, pc = Recording(), PruningCallback("gblm", "unstructured", Schedule(step=2, sparsity=0.5))
        trainer(3, [ic, pc]).fit(m, loader())
        snapshots.append(ic.snapshots[0])
    assert snapshots[1]["activations"]["model.layers.0.mlp.up_proj"]["count"] == 2 * SEQ
    assert_same_stats(snapshots[1], snapshots[0])
    ref_model = module().student.eval()
    assert_same_stats(snapshots[0]["activations"], reference_acts(ref_model, SEQS[:2]))


# ---------------------------------------------------------------------------------------------------- 2. frozen
class WeightsAt(pl.Callback):
    """Copies the student's weights and the optimiser state when ``global_step`` reaches ``step`` (placed before
    the pruning callback, so it sees the weights before the event)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.weights: dict | None = None
        self.optimizer_state = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.weights is None and trainer.global_step == self.step:
            self.weights = {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()}
            self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])


@pytest.mark.parametrize("freeze", [True, False, None])
def test_scoring_steps_change_no_weight(freeze):
    """Frozen scoring steps change no weight; by default (``None``) they train like any other step."""
    m = module(lr=1e-2, weight_decay=0.1)
    before = {k: v.detach().clone() for k, v in m.student.state_dict().items()}
    at = WeightsAt(4)
    ic = ImportanceCallback() if freeze is None else ImportanceCallback(freeze_weights=freeze)
    pc = PruningCallback("sdm", "mlp_neuron", Schedule(step=4))
    trainer(5, [at, ic, pc]).fit(m, loader())
    assert at.weights is not None and pc.done == 1
    same = [torch.equal(at.weights[k], before[k]) for k in before]
    if freeze:
        assert all(same)  # bitwise: no update, no weight decay
        assert at.optimizer_state == {}  # and no AdamW moments built up
    else:
        assert not any(same)


# ---------------------------------------------------------------------------------------------------- 3. hold
@pytest.mark.parametrize(
    "criterion,granularity,accumulate,precision",
    [
        ("wanda", "unstructured", 1, "32-true"),
        ("wanda", "unstructured", 2, "bf16-mixed"),
        ("sdm", "mlp_neuron", 2, "32-true"),
    ],
)
def test_masks_hold_through_recovery(criterion, granularity, accumulate, precision):
    """Steps 0-3 train (AdamW moments build up everywhere), 4-5 score, the event at 6 prunes, 6-25 recover: neither
    the moments from before the mask nor weight decay may revive a pruned weight."""
    m = module(lr=1e-2, weight_decay=0.1)
    at = WeightsAt(6)
    ic = ImportanceCallback(window=2, freeze_weights=True)
    pc = PruningCallback(criterion, granularity, Schedule(step=6, sparsity=0.5))
    tr = trainer(26, [at, ic, pc], accumulate_grad_batches=accumulate, precision=precision)
    tr.fit(m, loader())
    assert tr.global_step == 26 and pc.done == 1  # 20 recovery steps after the event
    assert pc.history[0]["micro_batches_scored_on_rank"] == 2 * accumulate
    assert_pruned_zero(m.student, pc.masks)
    params = named_parameters(m.student)
    for name in pc.masks.names():
        keep = pc.masks.keep_mask(name, params[name])
        assert not torch.equal(params[name].detach()[keep], at.weights[name][keep]), name  # it did train
        for v in tr.optimizers[0].state[params[name]].values():  # AdamW moments are zero where pruned too
            if torch.is_tensor(v) and v.shape == keep.shape:
                assert torch.count_nonzero(v[~keep]) == 0, name


# ---------------------------------------------------------------------------------------------------- 4. LoRA
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
PROBE = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(99))


class Unmerged(pl.Callback):
    """At the end of training, before the merge at fit end: the adapted model's logits and the adapters."""

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.eval()
        down = pl_module.student.get_submodule("model.layers.0.mlp.down_proj")
        handle = down.register_forward_pre_hook(lambda mod, args: setattr(self, "neurons", args[0].detach()))
        with torch.no_grad():
            self.logits = pl_module(PROBE)
        handle.remove()
        self.lora_b = {n: p.detach().clone() for n, p in pl_module.student.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("criterion,granularity,step", [("wanda", "unstructured", 2), ("magnitude", "mlp_neuron", 0)])
def test_lora_recovery_merges_into_masked_weights(criterion, granularity, step):
    m = module(lr=1e-2, weight_decay=0.1, teacher="none", lora=LORA)
    base = {n: p for n, p in named_parameters(m.student).items() if "lora_" not in n}
    assert not any(p.requires_grad for p in base.values())
    rec = Unmerged()
    ic = ImportanceCallback(freeze_weights=True)
    pc = PruningCallback(criterion, granularity, Schedule(step=step, sparsity=0.5))
    trainer(step + 10, [ic, pc, rec]).fit(m, loader())
    assert pc.done == 1
    assert rec.lora_b and all(torch.count_nonzero(b) > 0 for b in rec.lora_b.values())  # adapters trained
    assert not any("lora_" in n for n, _ in m.student.named_parameters())  # merged at fit end
    assert_pruned_zero(m.student, pc.masks)
    m.eval()
    with torch.no_grad():
        merged = m(PROBE)
    # the model that was trained (adapters on masked weights) is the model that is kept after the merge
    torch.testing.assert_close(merged, rec.logits, rtol=1e-5, atol=1e-5)
    if granularity == "mlp_neuron":  # pruned neurons stayed dead with the adapters on (gate/up adapters not reviving)
        keep = pc.masks.groups["mlp_neuron.0"]
        assert torch.count_nonzero(rec.neurons[..., ~keep]) == 0 and torch.count_nonzero(rec.neurons[..., keep]) > 0


@pytest.mark.parametrize("criterion", ["sdm", "taylor"])
def test_lora_with_gradient_criterion_is_refused(criterion):
    m = module(teacher="none", lora=LORA)
    ic, pc = ImportanceCallback(), PruningCallback(criterion, "mlp_neuron", Schedule(step=2, sparsity=0.25))
    with pytest.raises(ValueError, match=r"needs gradients of .* which are frozen \(LoRA freezes the base weights\)"):
        trainer(3, [ic, pc]).fit(m, loader())


# ---------------------------------------------------------------------------------------------------- 5. resume
class Resumable(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning 2.6 restarts a plain DataLoader from batch 0 when a checkpoint
    was taken mid-epoch (it only warns), so the batches after the resume would not be the ones the uninterrupted run
    sees. Lightning saves and restores the state of a loader with ``state_dict``/``load_state_dict``."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.yielded = 0
        self._skip = 0

    def __iter__(self):
        it = super().__iter__()
        for _ in range(self._skip):
            next(it)
        self.yielded, self._skip = self._skip, 0
        for batch in it:
            self.yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["yielded"]


class Seen(pl.Callback):
    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append(batch["input_ids"].clone())


class StopAt(pl.Callback):
    """Interrupts a run after optimiser step ``step`` (the run itself is planned for its full ``max_steps``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _resume_run(stop: int | None = None, ckpt: str | None = None):
    """SDM two stages with scoring windows of 3 steps: steps 0 and 4 train, 1-3 and 5-7 score, 8-11 recover;
    ``stop``: the run is interrupted after that step."""
    m = module(lr=1e-2, weight_decay=0.1)
    seen = Seen()
    ic = ImportanceCallback(window=3, freeze_weights=True)
    pc = PruningCallback("sdm", "mlp_neuron", Schedule(kind="steps", events=TWO_STAGE))
    tr = trainer(12, [seen, ic, pc] + ([StopAt(stop)] if stop is not None else []))
    tr.fit(m, Resumable(samples(SEQS), batch_size=1, shuffle=False), ckpt_path=ckpt)
    return m, ic, pc, tr, seen


def test_resume_mid_window_equals_uninterrupted(tmp_path):
    full, _, full_pc, _, full_seen = _resume_run()
    assert [h["step"] for h in full_pc.history] == [4, 8]

    _, ic, _, tr, _ = _resume_run(stop=6)
    assert ic.samples == 1 and ic.gradients.group_stats["mlp_neuron.0"].count == 1  # step 5 scored, 6 and 7 not
    path = str(tmp_path / "step6.ckpt")
    tr.save_checkpoint(path)
    resumed, ric, pc, tr2, seen = _resume_run(ckpt=path)
    assert tr2.global_step == 12
    # the data continued where it stopped (batch 6 of the epoch), not from the epoch's start
    assert all(torch.equal(a, b) for a, b in zip(seen.ids, full_seen.ids[6:])) and len(seen.ids) == 6
    assert pc.history == full_pc.history  # both events, event 2 from steps 5 (before) + 6, 7 (after the resume)
    assert_same_masks(pc.masks, full_pc.masks)
    # the lifted teacher's stash of original values came back with the checkpoint
    got, want = (m.state_dict(with_original=True)["original"] for m in (pc.masks, full_pc.masks))
    assert set(got) == set(want) and pc.masks.has_original
    for k, (fs, vals) in want.items():
        assert torch.equal(got[k][1], vals) and all(map(torch.equal, got[k][0], fs))
    for k, v in full.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert_pruned_zero(resumed.student, pc.masks)


# ---------------------------------------------------------------------------------------------------- 6. user module
class UserModule(pl.LightningModule):
    """A plain LightningModule: its own HF model at ``.model``, its own loss and optimiser."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_model("llama", seed=0).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)


class TrainedLogits(pl.Callback):
    """The user model's logits at the end of training (masked, before the export compacts it)."""

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.model.eval()
        with torch.no_grad():
            self.logits = pl_module.model(input_ids=PROBE).logits


def test_user_module_taylor_export_reloads(tmp_path):
    m = UserModule()
    path = tmp_path / "export"
    rec = TrainedLogits()
    ic = ImportanceCallback(freeze_weights=True)
    pc = PruningCallback("taylor", "mlp_neuron", Schedule(step=4, sparsity=0.25))
    trainer(10, [ic, pc, rec, ExportOnFitEnd(path)]).fit(m, loader())
    assert pc.done == 1
    assert m.model.config.intermediate_size == 48  # compacted in place at fit end (a quarter of the neurons)
    m.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.model(input_ids=PROBE).logits, rec.logits, rtol=1e-5, atol=1e-5)
        for reloaded in (AutoModelForCausalLM.from_pretrained(path), pruning.load_pretrained(path)):
            assert reloaded.config.intermediate_size == 48
            torch.testing.assert_close(reloaded.eval()(input_ids=PROBE).logits, rec.logits, rtol=1e-5, atol=1e-5)


def test_user_module_taylor_masks_equal_core():
    m = UserModule()
    ref_model = copy.deepcopy(m.model).eval()
    ic = ImportanceCallback(freeze_weights=True)
    pc = PruningCallback("taylor", "mlp_neuron", Schedule(step=4, sparsity=0.25))
    trainer(5, [ic, pc]).fit(m, loader())
    assert_same_masks(pc.masks, prune_core(ref_model, SEQS[:4], "taylor", 0.25, "mlp_neuron").masks)


# ---------------------------------------------------------------------------------------------------- 7. errors
def test_statistics_criterion_without_importance_callback():
    pc = PruningCallback("wanda", "unstructured", Schedule(step=2))
    with pytest.raises(ValueError, match=r"criterion='wanda' needs statistics .* add exactly one ImportanceCallback"):
        trainer(3, [pc]).fit(module(), loader())


@pytest.mark.parametrize("criterion", ["wanda", "sdm"])
def test_statistics_criterion_event_at_step_zero(criterion):
    granularity = "mlp_neuron" if criterion == "sdm" else "unstructured"
    with pytest.raises(ValueError, match=r"the first event is at step 0\. HINT: schedule the first event at a step"):
        PruningCallback(criterion, granularity, Schedule(step=0))


def test_fp16_loss_scaling_with_gradient_statistics():
    """fp16 AMP (a GradScaler; on CPU only through an explicit plugin) is refused for gradient criteria."""
    ic, pc = ImportanceCallback(), PruningCallback("taylor", "mlp_neuron", Schedule(step=2))
    with pytest.raises(
        ValueError,
        match=r"precision='16-mixed': fp16 loss scaling .* HINT: score with precision "
        r"bf16-mixed",
    ):
        trainer(3, [ic, pc], plugins=[MixedPrecision("16-mixed", "cpu")]).fit(module(), loader())
    # activation statistics do not read gradients: fp16 is fine for them
    ic, pc = ImportanceCallback(), PruningCallback("wanda", "unstructured", Schedule(step=2))
    trainer(3, [ic, pc], plugins=[MixedPrecision("16-mixed", "cpu")]).fit(module(), loader())
    assert pc.done == 1


def test_lifted_teacher_on_weight_changing_step():
    with pytest.raises(
        RuntimeError,
        match=r"alpha=0.5 with teacher='lifted' on a step that changes weights.*"
        r"HINT: set teacher: copy",
    ):
        trainer(1, []).fit(module(alpha=0.5), loader())
    # an event's distillation loss on scoring steps that are not frozen is refused the same way
    ic = ImportanceCallback(freeze_weights=False)
    pc = PruningCallback("sdm", "mlp_neuron", Schedule(kind="steps", events=[Event(2, 0.1, alpha=0.42)]))
    with pytest.raises(RuntimeError, match=r"alpha=0.42 with teacher='lifted' on a step that changes weights"):
        trainer(3, [ic, pc]).fit(module(), loader())
    # the same loss with a frozen teacher copy is fine
    ic = ImportanceCallback(freeze_weights=False)
    pc = PruningCallback("sdm", "mlp_neuron", Schedule(kind="steps", events=[Event(2, 0.1, alpha=0.42)]))
    trainer(3, [ic, pc]).fit(module(teacher="copy"), loader())
    assert pc.done == 1


def test_module_needs_exactly_one_source():
    with pytest.raises(ValueError, match=r"give exactly one of pretrained= .* and config="):
        DistillationModule()
    with pytest.raises(ValueError, match=r"give exactly one of pretrained= .* and config="):
        DistillationModule(pretrained="/nonexistent", config=CFG)


@pytest.mark.parametrize("source", ["config", "pretrained", "per_layer"])
def test_meta_init_loads_the_same_weights(tmp_path, source):
    """``meta_init`` without FSDP: built on the meta device, the weights loaded in ``configure_model`` (from a
    checkpoint's safetensors, a per-layer export, or the config's seeded initialisation) equal a plain build's; the
    ``copy`` teacher likewise."""
    import pruning

    kw: dict = {}
    if source != "config":
        model = module().student
        if source == "per_layer":
            res = pruning.prune(model, method="magnitude", granularity="mlp_neuron", layer_rates=[0.25, 0.5])
            pruning.compact(model, res.masks)
        pruning.save_pretrained(model, tmp_path / "ckpt")
        kw = {"pretrained": str(tmp_path / "ckpt"), "config": None}
    want = module(teacher="copy", **kw)
    got = module(teacher="copy", meta_init=True, **kw)
    assert all(p.is_meta for p in got.student.parameters())
    for m in (want, got):
        m.setup("fit")
        m.configure_model()
    for a, b in ((got.student, want.student), (got.teacher, want.teacher)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)
    ids = torch.randint(0, 128, (1, 8))
    torch.testing.assert_close(got.student(input_ids=ids).logits, want.student(input_ids=ids).logits)


@pytest.mark.parametrize("source", ["config", "pretrained"])
def test_meta_init_with_lora_loads_the_same_weights_and_adapters(tmp_path, source):
    """``meta_init`` with ``lora``: the adapters injected on the meta device, then the base weights loaded under
    their wrapped names (``...base_layer.weight``) and the adapters written from ``init_seed``: the same state as a
    plain build with LoRA, whose adapters are drawn from the same seed (a different seed draws other ones)."""
    kw: dict = {}
    if source == "pretrained":
        module().student.save_pretrained(tmp_path / "ckpt")
        kw = {"pretrained": str(tmp_path / "ckpt"), "config": None}
    want = module(lora=LORA, **kw)
    got = module(lora=LORA, meta_init=True, **kw)
    assert all(p.is_meta for p in got.student.parameters())
    got.configure_model()
    sa, sb = got.student.state_dict(), want.student.state_dict()
    assert any(".lora_A." in k for k in sb) and any(".base_layer." in k for k in sb)
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)
    other = module(lora=LORA, init_seed=1, **kw).student.state_dict()
    assert all(not torch.equal(other[k], sb[k]) for k in sb if ".lora_A." in k)
