"""SAAP's group fine-tuning: decoder layers are split into groups that are trained in turn, the rest frozen."""

from __future__ import annotations

import re
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from pruning.quantize import dequantized, freeze_int8, is_int8, thaw
from pruning.structure import family_of

from .export import find_hf_model


class GroupFinetuneCallback(pl.Callback):
    """Recovery by groups of layers (SAAP, 2024): the decoder layers are split into ``groups`` contiguous groups;
    group ``j`` alone is updated for ``steps_per_group`` optimiser steps, then group ``j + 1``, and so on (cycling
    back to the first group with ``cycle``; without it every parameter trains again once each group has had its
    turn). Steps before ``start_step`` (e.g. scoring and pruning steps) are left alone. Parameters outside the
    decoder layers (embeddings, final norm, LM head) are frozen during the turns unless ``train_outside_layers``.

    How a group is frozen (``mode``):

    - ``drop_grads`` (default): every parameter keeps ``requires_grad`` and gets its gradient; the frozen ones'
      gradients are set to ``None`` in ``on_before_optimizer_step`` — once per optimiser step, after gradient
      accumulation and the DDP all-reduce, before clipping (so the clipping norm is the active group's). Every
      optimiser skips a parameter without a gradient: no update, no weight decay, no change of its moments. Works
      with any optimiser and with DDP as is, because the set of parameters with gradients never changes during
      backward. Saves optimiser work, not backward compute.
    - ``requires_grad``: frozen parameters get ``requires_grad=False`` at the first micro-batch of each turn, so
      backward skips their weight gradients (less compute and gradient memory). Under DDP this needs
      ``strategy: {class_path: lightning.pytorch.strategies.DDPStrategy, init_args: {find_unused_parameters:
      true}}``: the reducer otherwise waits for gradients that never come. The flags are restored at the end of
      training.

    The turn is a function of ``trainer.global_step`` alone, so a resumed run continues in the same turn.

    ``quantize`` (SAAP's "quantize and update", with ``mode: requires_grad``): during each turn the Linear weights of
    the frozen groups are held as int8 per output row (:mod:`pruning.quantize`: a quarter of their fp32 memory),
    computed with dequantized on the fly (the gradient still flows through them to earlier groups); when a group's
    turn comes its weights are dequantized back and trained, carrying the int8 rounding. Pruned weights stay zero.
    Checkpoints hold the dequantized values, and every weight is full precision again when training ends. Every
    pruning event must come before ``start_step`` (scoring reads the weights).

    Args:
        groups: number of layer groups (contiguous, sizes differing by at most one layer).
        steps_per_group: optimiser steps of one turn.
        start_step: the first optimiser step that fine-tunes by groups.
        cycle: after the last group, start again with the first (else: train everything from then on).
        train_outside_layers: also update embeddings, the final norm and the LM head in every turn.
        mode: ``drop_grads`` or ``requires_grad`` (see above).
        quantize: hold the frozen groups' Linear weights as int8 during the turns (see above).
        model_attr: attribute of the LightningModule holding the Hugging Face model.
    """

    def __init__(
        self,
        groups: int = 4,
        steps_per_group: int = 100,
        start_step: int = 0,
        cycle: bool = True,
        train_outside_layers: bool = False,
        mode: Literal["drop_grads", "requires_grad"] = "drop_grads",
        quantize: bool = False,
        model_attr: str | None = None,
    ) -> None:
        if groups < 1:
            raise ValueError(f"groups={groups} must be >= 1")
        if steps_per_group < 1:
            raise ValueError(f"steps_per_group={steps_per_group} must be >= 1")
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0")
        if mode not in ("drop_grads", "requires_grad"):
            raise ValueError(f"mode={mode!r} must be 'drop_grads' or 'requires_grad'")
        if quantize and mode != "requires_grad":
            raise ValueError(
                "quantize=true holds frozen weights as int8, which cannot have gradients. HINT: set mode: requires_grad"
            )
        self.groups = groups
        self.steps_per_group = steps_per_group
        self.start_step = start_step
        self.cycle = cycle
        self.train_outside_layers = train_outside_layers
        self.mode = mode
        self.quantize = quantize
        self.model_attr = model_attr
        self._linears: list[list[torch.nn.Linear]] = []  # the Linear modules of each group (quantize)
        self.layer_groups: list[list[int]] = []
        self._members: list[set[int]] = []  # ids of the parameters of each group
        self._outside: set[int] = set()
        self._params: dict[int, torch.nn.Parameter] = {}
        self._saved_flags: dict[int, bool] | None = None
        self._turn: int | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = find_hf_model(pl_module, self.model_attr)
        n_layers = int(model.config.num_hidden_layers)
        if self.groups > n_layers:
            raise ValueError(f"groups={self.groups} exceeds the model's {n_layers} decoder layers")
        bounds = [round(j * n_layers / self.groups) for j in range(self.groups + 1)]
        self.layer_groups = [list(range(bounds[j], bounds[j + 1])) for j in range(self.groups)]
        group_of = {i: j for j, layers in enumerate(self.layer_groups) for i in layers}
        pattern = re.compile(r"(?:^|\.)" + re.escape(family_of(model).layers) + r"\.(\d+)\.")
        self._members = [set() for _ in range(self.groups)]
        self._outside = set()
        self._params = {}
        self._linears = [[] for _ in range(self.groups)]
        for name, module in model.named_modules():
            m = pattern.search(name + ".")
            if isinstance(module, torch.nn.Linear) and m is not None and "lora_" not in name:
                self._linears[group_of[int(m.group(1))]].append(module)
        if self.quantize:
            self._check_events_before_start(trainer)
            if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
                raise ValueError(
                    "quantize=true swaps each frozen weight's storage for int8, which a sharded (FSDP) parameter "
                    "cannot take. HINT: quantize: false under FSDP (group fine-tuning itself works)"
                )
        for name, p in model.named_parameters():
            self._params[id(p)] = p
            m = pattern.search(name)
            if m is None:
                self._outside.add(id(p))
            else:
                self._members[group_of[int(m.group(1))]].add(id(p))

    def _check_events_before_start(self, trainer: pl.Trainer) -> None:
        from .pruning import PruningCallback

        for cb in trainer.callbacks:
            # an event at start_step itself may run after the first turn froze groups to int8 (callback order)
            if isinstance(cb, PruningCallback) and cb.schedule.plan()[-1].step >= self.start_step:
                raise ValueError(
                    f"quantize=true holds frozen weights as int8 from start_step={self.start_step}, but a pruning "
                    f"event comes at step {cb.schedule.plan()[-1].step}, and scoring reads the weights. HINT: set "
                    "start_step after the last pruning event"
                )

    def turn(self, step: int) -> int | None:
        """The group trained at optimiser step ``step`` (``None``: no group fine-tuning at that step)."""
        if step < self.start_step:
            return None
        j = (step - self.start_step) // self.steps_per_group
        if j >= self.groups and not self.cycle:
            return None
        return j % self.groups

    def _active(self, turn: int) -> set[int]:
        return self._members[turn] | (self._outside if self.train_outside_layers else set())

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        turn = self.turn(trainer.global_step)
        if turn != self._turn and trainer.logger is not None and turn is not None:
            trainer.logger.log_metrics({"group_finetune/group": float(turn)}, step=trainer.global_step)
        if self.mode == "requires_grad" and turn != self._turn:
            if self._saved_flags is None:
                self._saved_flags = {i: p.requires_grad for i, p in self._params.items()}
            if self.quantize:  # the active group (every group between turns) is full precision before it trains
                for j, linears in enumerate(self._linears):
                    for lin in linears if turn is None or j == turn else ():
                        thaw(lin)
            active = self._active(turn) if turn is not None else set(self._params)
            for i, p in self._params.items():
                p.requires_grad_(self._saved_flags[i] and i in active)
            if self.quantize and turn is not None:
                for j, linears in enumerate(self._linears):
                    for lin in linears if j != turn else ():
                        freeze_int8(lin)
        self._turn = turn

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        turn = self.turn(trainer.global_step)
        if self.mode != "drop_grads" or turn is None:
            return
        active = self._active(turn)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._params and id(p) not in active:
                    p.grad = None  # optimisers skip parameters without a gradient: no update, no decay

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """int8-held weights are saved dequantized (full precision, as the model's own state_dict would hold)."""
        if not self.quantize:
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for lin in (lin for linears in self._linears for lin in linears):
            name = names.get(id(lin.weight))
            if is_int8(lin) and name in checkpoint.get("state_dict", {}):
                checkpoint["state_dict"][name] = dequantized(lin).cpu()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # an interrupted run leaves the model full precision too

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for lin in (lin for linears in self._linears for lin in linears):
            thaw(lin)
        if self._saved_flags is not None:
            for i, p in self._params.items():
                p.requires_grad_(self._saved_flags[i])
            self._saved_flags = None
        self._turn = None
