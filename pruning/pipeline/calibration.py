"""Calibration passes: the data a one-shot run scores on, its record, and the per-sequence gradient statistics of
the gradient criteria from batched backwards (activations are collected by forward hooks, see
:mod:`pruning.stats`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..losses import KLPositions, distillation_loss
from ..masks import MaskSet
from ..stats import GradientCollector


def calibration_batches(calibration: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """The calibration data as ``[batch, seq]`` token-id tensors (a ``[seq]`` tensor is one sequence)."""
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
        calibration = [calibration]  # one batch given as the tensor itself
    batches = []
    for i, c in enumerate(calibration or []):
        if not isinstance(c, torch.Tensor) or c.dim() not in (1, 2):
            what = f"a {c.dim()}-D tensor" if isinstance(c, torch.Tensor) else f"a {type(c).__name__}"
            raise TypeError(
                f"calibration[{i}] is {what}; calibration is an iterable of token-id tensors [batch, seq] (or [seq]). "
                "HINT: e.g. [torch.tensor(ids).unsqueeze(0) for ids in token_lists], or list(big_tensor.split(8))"
            )
        if c.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"calibration tensors must hold token ids (int64), got {c.dtype}")
        batches.append(c if c.dim() == 2 else c.unsqueeze(0))
    return batches


def check_calibration(batches: Sequence[torch.Tensor], model: nn.Module) -> None:
    """Token ids inside the model's vocabulary, sequences inside its position table: clear errors now, not an
    index error deep in the embedding or the rotary table."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    positions = getattr(config, "max_position_embeddings", None)
    for i, b in enumerate(batches):
        if vocab is not None and b.numel() and (int(b.max()) >= vocab or int(b.min()) < 0):
            raise ValueError(
                f"calibration[{i}] holds token ids in [{int(b.min())}, {int(b.max())}], outside the model's "
                f"vocabulary of {vocab}. HINT: tokenize the calibration text with the model's own tokenizer"
            )
        if positions is not None and b.shape[-1] > positions:
            raise ValueError(
                f"calibration[{i}] has sequences of {b.shape[-1]} tokens; the model's position table holds "
                f"{positions} (max_position_embeddings). HINT: cut the calibration into shorter windows"
            )


def calibration_fingerprint(batches: Sequence[torch.Tensor]) -> dict:
    """Count and sha256 of the token ids (int64, row-major, in order): the same number means the same data."""
    h = hashlib.sha256()
    tokens = 0
    for b in batches:
        h.update(b.detach().to(torch.int64).cpu().contiguous().numpy().tobytes())
        tokens += b.numel()
    return {
        "batches": len(batches),
        "sequences": sum(b.shape[0] for b in batches),
        "tokens": tokens,
        "sha256": h.hexdigest(),
    }


def check_distillation_gradient(
    alpha: float, temperature: float, masks: MaskSet | None, model=None, teacher: nn.Module | None = None
) -> None:
    """Refuse a loss whose gradient is identically zero (KL alone at τ = 1 while the student equals the teacher),
    and a lifted teacher whose masks kept no original weights."""
    if alpha > 0 and teacher is None and masks is not None and len(masks) and not masks.has_original:
        raise ValueError(
            "alpha>0 needs the original weights for the teacher, but these masks were applied without "
            "keep_original=True. HINT: apply the masks with MaskSet.apply(model, keep_original=True)."
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    pruned = False
    if masks is not None and model is not None and len(masks):
        pruned = masks.report(model).model.pruned > 0
    if alpha == 1 and temperature == 1 and not pruned:
        raise ValueError(
            "alpha=1, temperature=1 on an unpruned model: the student equals the teacher, so KL(teacher ‖ student)"
            " and its gradient are identically zero and every score would be 0. HINT: use SDMPrune's two stages: "
            "first score with cross-entropy (alpha=0) and prune lightly, then score with alpha>0 against the "
            "original model; or set alpha<1 or temperature!=1."
        )


def iter_sequences(calibration: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """Split every [batch, seq] tensor into [1, seq] samples: per-sample statistics are per sequence."""
    for batch in calibration:
        batch = batch if batch.dim() == 2 else batch.unsqueeze(0)
        for row in batch:
            yield row.unsqueeze(0)


GradientPass = Literal["batched", "sums", "per_sequence"]


def gradient_pass(collector: GradientCollector, batched: bool = True) -> GradientPass:
    """How :func:`collect_gradients` fills ``collector``: ``sums`` (only ``Σ_n g_n`` wanted: a batched backward's
    ``.grad``, whatever the parameters), ``batched`` (per-sequence statistics from batched backwards) or
    ``per_sequence`` (one backward per sequence: asked for with ``batched=False``, or some parameter is not a
    Linear's own, see :meth:`GradientCollector.unbatchable`)."""
    if not batched:
        return "per_sequence"
    if collector.sums_only:
        return "sums"
    return "per_sequence" if collector.unbatchable() else "batched"


def sequence_losses(
    logits: torch.Tensor,
    ids: torch.Tensor,
    target: torch.Tensor | None,
    alpha: float,
    temperature: float,
    kl_positions: KLPositions = "labelled",
) -> torch.Tensor:
    """The sum over the batch's rows of each row's own mean loss, so that a batched backward gives every sequence
    the gradient it has alone: every row of a calibration tensor has the same number of next-token positions, so
    that is the batch's mean times its rows (one fused loss, no per-row slices to add back up in backward)."""
    return distillation_loss(logits, ids, target, alpha, temperature, kl_positions=kl_positions) * logits.shape[0]


def collect_gradients(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    collector: GradientCollector,
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    kl_positions: KLPositions = "labelled",
    masks: MaskSet | None = None,
    teacher: nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    batched: bool = True,
) -> GradientCollector:
    """Per-sequence gradient statistics of ``calibration`` into ``collector``; weights are not changed.

    One backward per calibration tensor (a micro-batch of its rows), of the sum of every sequence's own mean loss:
    the per-sequence gradients come out of that backward (:class:`~pruning.stats.SequenceGradients`), and a
    criterion that needs only their sum (Taylor) reads the batch's ``.grad``. ``batched=False`` (or parameters a
    batched backward cannot serve, :func:`gradient_pass`): one backward per sequence, the reference protocol.

    With ``alpha > 0`` the teacher is the same model with the masks lifted (``masks`` must have been applied with
    ``keep_original=True``; with no masks at all the teacher is the model itself): no second copy is held. Or
    ``teacher``: a separate frozen model (SDMPrune's own arrangement, a second set of weights), run without
    gradients. Only the parameters the collector reads require gradients during the pass. ``kl_positions``: the
    KL's positions (:func:`~pruning.losses.distillation_loss`).
    """
    check_distillation_gradient(alpha, temperature, masks, model, teacher)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    how = gradient_pass(collector, batched)
    batches = list(iter_sequences(calibration) if how == "per_sequence" else calibration_batches(calibration))
    weight_grads = collector.weight_grads
    bar = tqdm(total=sum(b.shape[0] for b in batches), desc="gradients", unit="seq", disable=not progress)
    with gradient_mode(model, collector):
        try:
            if how == "batched":
                collector.weight_grads = False  # the statistics are made in the backward; nobody reads .grad
                collector.attach()
            for ids in batches:
                ids = ids.to(device)
                target = _teacher_logits(model, ids, alpha, masks, teacher)
                if how == "batched":
                    collector.begin_batch(ids.shape[0])
                logits = model(input_ids=ids, use_cache=False).logits
                if alpha > 0 and target is None:  # nothing pruned yet: the teacher is the student itself
                    target = logits.detach()
                loss = sequence_losses(logits, ids, target, alpha, temperature, kl_positions)
                del logits, target  # the fused loss keeps only its gradient: nothing else of [seq, vocab] lives on
                loss.backward()
                if how == "batched":
                    collector.end_batch()
                else:
                    collector.update(samples=ids.shape[0])
                for p in model.parameters():
                    p.grad = None
                bar.update(ids.shape[0])
        finally:
            bar.close()
            if how == "batched":
                collector.detach()
                collector.weight_grads = weight_grads
    return collector


@contextmanager
def gradient_mode(model: nn.Module, collector: GradientCollector) -> Iterator[set[int]]:
    """``model`` in eval mode with only the parameters ``collector`` reads requiring gradients (by identity: a tied
    weight has several names) and no ``.grad``; yields their ids; every flag restored on exit."""
    wanted = {id(p) for p in collector.parameters.values()}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    try:
        yield wanted
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.train(was_training)


def _teacher_logits(
    model: nn.Module, ids: torch.Tensor, alpha: float, masks: MaskSet | None, teacher: nn.Module | None
) -> torch.Tensor | None:
    """The distillation target of ``ids``: the separate teacher's logits, or the model's with the masks lifted
    (``None``: no distillation, or nothing pruned yet)."""
    if alpha > 0 and teacher is not None:
        with torch.no_grad():
            return teacher(input_ids=ids, use_cache=False).logits
    if alpha > 0 and masks is not None and masks.has_original:
        # before the student's forward: lifting writes the weights that backward will read
        with torch.no_grad(), masks.lifted(model):
            return model(input_ids=ids, use_cache=False).logits
    return None
