"""The 2-rank FSDP2 runs of ``tests/test_fsdp.py`` (``python tests/fsdp_script.py OUT CRITERION MODE``).

Lightning's ``ModelParallelStrategy`` (CPU, gloo, ``data_parallel_size=2``) starts rank 1 by re-running this command.
``MODE``: ``full`` (one run of ``MAX_STEPS`` with an export at the end), ``meta`` / ``meta_pretrained`` (the same
with ``meta_init``: from the config, or from the checkpoint ``OUT/checkpoint``), ``lora`` / ``lora_meta`` (LoRA
recovery after a ``LORA_SCHEDULES`` event, merged at the end, exported; built whole, or on meta) or ``resume`` (a
run stopped at step 3, inside a scoring window (``RESUME``), saved as a sharded checkpoint, then resumed to
``MAX_STEPS`` in a new trainer) or ``lora_resume`` (LoRA recovery checkpointed at step ``LORA_SAVE`` while the
adapters train, as ``ModelCheckpoint`` saves, the run interrupted there and resumed to ``MAX_STEPS``, merged, exported).
Each rank writes ``OUT/<mode>_rank<r>.pt``.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from test_lightning import SEQS, Recording, Resumable, StopAt, module, samples  # noqa: E402

from pruning.callbacks import ExportOnFitEnd, PruningCallback  # noqa: E402
from pruning.distributed import full_state_dict, is_dtensor, local_rows  # noqa: E402
from pruning.importance import ScoreContext  # noqa: E402
from pruning.schedule import Event, Schedule  # noqa: E402

SCHEDULES = {
    # SDMPrune's two stages: group (coupled) gradient statistics, the lifted teacher on sharded weights
    "sdm": ("mlp_neuron", [Event(2, 0.1), Event(4, 0.3, alpha=0.42, temperature=0.5)]),
    # GBLM: activation statistics and per-weight gradient statistics (Σg²) together
    "gblm": ("unstructured", [Event(2, 0.5)]),
}
# the resumed runs stop at step 3, inside an event's scoring window: sdm's second one, gblm's only one (its per-weight
# statistics are row-sharded, so the checkpoint gathers the rows and the resumed ranks cut them again)
RESUME = {"sdm": SCHEDULES["sdm"], "gblm": ("unstructured", [Event(4, 0.5)])}
# LoRA recovery on the sharded student (activation criteria: LoRA freezes the base weights): unstructured element
# masks (held as each rank's rows, gathered for the adapters' forward) and MLP neurons (row and column factors)
LORA_SCHEDULES = {"wanda": ("unstructured", [Event(2, 0.5)]), "magnitude": ("mlp_neuron", [Event(2, 0.25)])}
# a tiny Mixtral (3-D expert weights, sharded by experts): whole experts by REAP's routing statistics, expert neurons
# by Taylor's gradients of the 3-D weights (not Linears: micro-batches of one sequence, MOE_BATCH)
MOE = {"reap": ("expert", [Event(2, 0.25)]), "taylor": ("expert_neuron", [Event(2, 0.25)])}
MOE_BATCH = {"reap": 2, "taylor": 1}
MAX_STEPS = 6
LORA_SAVE = 4  # after the LoRA event at step 2: the checkpoint holds adapters with 2 steps of training
BATCH = 2  # sequences per micro-batch: each rank's step scores 2, one process's (2 micro-batches) 4


class Held(Recording):
    """Also records the shapes of the per-weight gradient sums each rank holds just before the event's reduction, and
    whether the student has gradients when the optimiser is about to step."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.held: list[dict] = []
        self.grads_at_step: list[tuple[int, bool, bool]] = []  # (step, scoring, any gradient before the step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad is not None for p in pl_module.student.parameters() if p.requires_grad]
        self.grads_at_step.append((trainer.global_step, self._active, any(grads)))
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def collected(self, lazy: bool = False):
        if self.gradients is not None:
            self.held.append(
                {k: {kind: tuple(t.shape) for kind, t in s.sums.items()} for k, s in self.gradients.stats.items()}
            )
        return super().collected(lazy)


class SaveAt(pl.Callback):
    """Saves a checkpoint after optimiser step ``step``, inside training (where ``ModelCheckpoint`` saves: before the
    end of fit merges the LoRA adapters)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class Adapters(Held):
    """Also records, before the merge at the end of fit, whether the LoRA adapters and their base weights are
    sharded (name -> (is a DTensor, global shape, local shape)) and the adapters' local ``B`` rows."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.adapters: dict = {}

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        for n, p in pl_module.student.named_parameters():
            if "lora_" in n or "layers.0.mlp.down_proj" in n:
                loc = p.to_local() if is_dtensor(p) else p
                self.adapters[n] = (is_dtensor(p), tuple(p.shape), tuple(loc.shape), loc.detach().clone())


@contextmanager
def whole_at_read(reads: list):
    """Records, at every read of a gradient statistic by a criterion, ``(name, the row-sharded statistics whole at
    that moment)``: an event scoring one layer at a time must hold only that layer's."""
    read = ScoreContext.grad_stat

    def recording(ctx, weight_name, kind):
        whole = sorted(
            n
            for n, s in ctx.grad.items()
            if s.shard is not None and any(t.shape[0] == s.shard.total for t in s.sums.values())
        )
        reads.append((weight_name, whole))
        return read(ctx, weight_name, kind)

    ScoreContext.grad_stat = recording
    try:
        yield
    finally:
        ScoreContext.grad_stat = read


def trainer(max_steps: int, callbacks: list, world: int):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    kw = (
        dict(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2)
        if world == 2
        else dict(devices=1, accumulate_grad_batches=2)
    )
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **kw,
    )


def loader(tr, world: int, batch: int = BATCH):
    from torch.utils.data import DistributedSampler

    data = samples(SEQS)
    # rank r sees sequences r, r + 2, ... (as in tests/test_lightning_ddp.py); one process sees them in order
    sampler = DistributedSampler(data, num_replicas=2, rank=tr.global_rank, shuffle=False) if world == 2 else None
    return Resumable(data, batch_size=batch, sampler=sampler, shuffle=False)


def run(
    criterion: str,
    world: int,
    stop: int | None = None,
    export: Path | None = None,
    ckpt: str | None = None,
    save: str | None = None,
    save_at: int | None = None,
    schedules: dict = SCHEDULES,
    batch: int = BATCH,
    **module_kw,
) -> dict:
    granularity, events = schedules[criterion]
    m = module(lr=1e-2, weight_decay=0.1, **module_kw)
    ic = Adapters() if module_kw.get("lora") is not None else Held()
    pc = PruningCallback(criterion, granularity, Schedule(kind="steps", events=events))
    cbs = [ic, pc] + ([ExportOnFitEnd(export)] if export is not None else [])
    cbs += [SaveAt(save_at, save)] if save_at is not None else []
    cbs += [StopAt(stop)] if stop is not None else []  # an interrupted run of MAX_STEPS
    tr = trainer(MAX_STEPS, cbs, world)
    reads: list = []
    with whole_at_read(reads):
        tr.fit(m, loader(tr, world, batch), ckpt_path=ckpt)
    if save is not None and save_at is None:
        tr.save_checkpoint(save)
    m.student.eval()
    with torch.no_grad():  # the masked model after the events (a masked router routes to kept experts only)
        logits = m.student(input_ids=torch.stack(SEQS[:4])).logits
    params = dict(m.student.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    name = name if name in params else "model.layers.0.mlp.experts.down_proj"  # MoE: a 3-D weight of all experts
    p = params[name]
    info = {"dtensor": is_dtensor(p), "global_shape": tuple(p.shape)}
    if is_dtensor(p):
        info.update(placements=[str(x) for x in p.placements], local_shape=tuple(p.to_local().shape))
        mask = pc.masks.sharded_mask(name, p)
        # the element masks each rank holds after the event: (its rows of the parameter, the rows held)
        info["element_held"] = {k: (local_rows(params[k]), v.clone()) for k, v in pc.masks.element.items()}
        info.update(
            mask_dtensor=is_dtensor(mask),
            mask_placements=[str(x) for x in mask.placements],
            mask_local=mask.to_local().clone(),
            local_weight=p.to_local().detach().clone(),
        )
        weights = full_state_dict(m.student)  # collective; full on rank 0
    else:
        weights = {k: v.detach().clone() for k, v in m.student.state_dict().items()}
    return {
        "rank": tr.global_rank,
        "world": tr.world_size,
        "snapshots": ic.snapshots,
        "masks": pc.masks.state_dict(),
        "history": pc.history,
        "weights": weights,
        "info": info,
        "global_step": tr.global_step,
        "teacher_stash": pc.masks.has_original,
        "held": ic.held,
        "grads_at_step": ic.grads_at_step,
        "whole_at_read": reads,
        "adapters": getattr(ic, "adapters", None),
        "logits": logits,
    }


if __name__ == "__main__":
    out, crit, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "full":
        res = run(crit, 2, export=out / "export_fsdp")
    elif mode in ("meta", "meta_pretrained"):  # built on meta, each rank loads its rows after sharding
        kw = {"pretrained": str(out / "checkpoint"), "config": None} if mode == "meta_pretrained" else {}
        res = run(crit, 2, export=out / f"export_{mode}", meta_init=True, **kw)
    elif mode in ("lora", "lora_meta"):  # LoRA recovery on the sharded student, merged on the shards at fit end
        from test_lightning import LORA

        kw = dict(schedules=LORA_SCHEDULES, lora=LORA, teacher="none", meta_init=mode == "lora_meta")
        res = run(crit, 2, export=out / "export_lora", **kw)
    elif mode == "lora_resume":  # checkpointed while the adapters train, resumed in a new trainer, merged at the end
        from test_lightning import LORA

        kw = dict(schedules=LORA_SCHEDULES, lora=LORA, teacher="none")
        ckpt = str(out / "ckpt")
        first = run(crit, 2, stop=LORA_SAVE, save=ckpt, save_at=LORA_SAVE, **kw)
        res = run(crit, 2, ckpt=ckpt, export=out / "export_lora_resume", **kw)
        res["first_history"], res["first_step"] = first["history"], first["global_step"]
    elif mode == "moe":  # a tiny Mixtral, exported at the end
        from tiny import tiny_config_dict

        kw = dict(schedules=MOE, batch=MOE_BATCH[crit], config=tiny_config_dict("mixtral"))
        res = run(crit, 2, export=out / "export_moe", **kw)
    else:  # stop at step 3 (second event's window half-scored), sharded checkpoint, resume in a new trainer
        first = run(crit, 2, stop=3, save=str(out / "ckpt"), schedules=RESUME)
        res = run(crit, 2, ckpt=str(out / "ckpt"), schedules=RESUME)
        res["first_history"] = first["history"]
    torch.save(res, out / f"{mode}_rank{res['rank']}.pt")
