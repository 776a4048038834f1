"""One plain causal-LM training loop: AdamW, a learning-rate schedule, gradient clipping, optional autocast and masks
held, progress every N steps.

The demo model (:mod:`pruning.commands.demo`), the quality benchmark's reference model and its recovery runs all
train through :func:`train`; a batch source is either a callable (a fresh batch per call, e.g.
:class:`RandomWindows`) or an iterable of ``[batch, seq]`` token-id tensors. Lightning runs train through
``pruning.lightning`` instead; this loop is for scripts and commands that need no Trainer.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from .masks import MaskSet

SCHEDULES = ("constant", "cosine", "onecycle")
AUTOCAST_DTYPES = ("bfloat16", "float16")
BatchSource = Callable[[], torch.Tensor] | Iterable[torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`train` trains (every field is plain data, so a config file can express it)."""

    steps: int  # optimiser steps
    lr: float  # peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (β1, β2); ``onecycle`` cycles β1 between 0.85 and 0.95
    decay_vectors: bool = True  # False: 1-D parameters (norm weights, biases) get no weight decay
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"  # see :func:`scheduled_lr`
    warmup: float = 0.0  # fraction of the steps: linear warm-up (constant, cosine) or onecycle's ``pct_start``
    min_lr: float = 0.0  # cosine: the final learning rate as a fraction of ``lr``
    clip_grad_norm: float | None = 1.0  # clip the global gradient norm to this (None: no clipping)
    autocast: Literal["bfloat16", "float16"] | None = None  # mixed precision for the forward pass
    log_every: int = 0  # a progress line every this many steps and at the last one (0: none)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1. HINT: give the number of optimiser steps to run")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}. HINT: 'constant' keeps lr fixed")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup={self.warmup} must be in [0, 1). HINT: it is a fraction of the steps, e.g. 0.05")
        if not 0.0 <= self.min_lr <= 1.0:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, 1]. HINT: it is a fraction of lr, e.g. 0.1")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={self.autocast!r} must be None or one of {AUTOCAST_DTYPES}")
        if self.log_every < 0:
            raise ValueError(f"log_every={self.log_every} must be >= 0. HINT: 0 logs nothing")


def scheduled_lr(step: int, config: TrainConfig, lr: float | None = None) -> float:
    """The learning rate of 0-based ``step`` under ``constant`` or ``cosine`` (``lr`` defaults to ``config.lr``).

    Linear warm-up over ``w = max(1, round(warmup·steps))`` steps, ``lr·(step+1)/w``; then ``constant`` stays at
    ``lr`` and ``cosine`` decays as ``lr·(m + (1−m)·½(1 + cos(π·t)))``, ``t = (step−w)/max(1, steps−w)``, ``m`` =
    ``min_lr``. (``onecycle`` is torch's ``OneCycleLR``: warm-up from lr/25, cosine annealing to lr/25/10⁴.)
    """
    lr = config.lr if lr is None else lr
    warm = max(1, round(config.warmup * config.steps))
    if step < warm:
        return lr * (step + 1) / warm
    if config.schedule == "constant":
        return lr
    t = (step - warm) / max(1, config.steps - warm)
    return lr * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * t)))


class WarmupSchedule(torch.optim.lr_scheduler.LRScheduler):
    """:func:`scheduled_lr` as a torch scheduler (each parameter group scaled from its own initial lr)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
        self.config = config
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [scheduled_lr(self.last_epoch, self.config, float(base)) for base in self.base_lrs]


class RandomWindows:
    """A batch source: ``batch`` windows of ``seq_len`` tokens at seeded random offsets of a 1-D token stream, a new
    draw on every call (from one generator, so the sequence of batches is fixed by ``seed``)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch: int, seed: int = 0) -> None:
        if stream.dim() != 1 or stream.numel() <= seq_len:
            raise ValueError(
                f"stream of shape {tuple(stream.shape)} must be 1-D and longer than seq_len={seq_len}. "
                "HINT: pass the whole token stream of the split, or a shorter seq_len"
            )
        self.stream, self.seq_len, self.batch = stream, seq_len, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        starts = torch.randint(0, self.stream.numel() - self.seq_len, (self.batch,), generator=self.generator)
        return self.stream[starts[:, None] + torch.arange(self.seq_len)[None, :]]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every parameter (with ``decay_vectors=False``: two groups, 1-D parameters without decay)."""
    if config.decay_vectors:
        return torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``config``, stepped once after every optimiser step."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=config.warmup
        )
    return WarmupSchedule(optimizer, config)


def _batches(source: BatchSource, steps: int) -> Iterator[torch.Tensor]:
    if callable(source):
        for _ in range(steps):
            yield source()
        return
    it = iter(source)
    for step in range(steps):
        try:
            yield next(it)
        except StopIteration:
            raise ValueError(
                f"the batch source ran out after {step} of {steps} steps. HINT: give as many batches as steps, "
                "or a callable that draws a new batch per call"
            ) from None


def _autocast(device: torch.device, config: TrainConfig) -> contextlib.AbstractContextManager:
    if config.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, config.autocast))


def train(
    model: nn.Module,
    batches: BatchSource,
    config: TrainConfig,
    masks: MaskSet | None = None,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Train ``model`` on ``config.steps`` batches of token ids (labels = inputs, the model shifts them) and return
    the loss of every step. ``masks`` are attached for the run (pruned weights, their gradients and AdamW's moments
    stay exactly zero) and detached after; the model is left in the train/eval mode it came in."""
    was_training = model.training
    device = next(model.parameters()).device
    losses: list[float] = []
    tokens, t0 = 0, time.time()
    if masks is not None:
        masks.attach(model)
    try:
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config)
        model.train()
        for step, ids in enumerate(_batches(batches, config.steps)):
            ids = ids.to(device)
            with _autocast(device, config):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += ids.numel()
            if log is not None and config.log_every and (step % config.log_every == 0 or step == config.steps - 1):
                dt = time.time() - t0
                log(
                    f"  step {step + 1:5d}/{config.steps}  loss {losses[-1]:.3f}  lr {lr:.2e}  "
                    f"{tokens / max(dt, 1e-9):.0f} tok/s  ({dt:.0f}s)"
                )
    finally:
        if masks is not None:
            masks.detach()
        model.train(was_training)
    return losses
