"""Per-sample gradients for the gradient-based criteria, and the (self-)distillation loss that produces them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .masks import MaskSet
from .stats import GradientCollector


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Shifted next-token cross-entropy in fp32; label -100 is ignored."""
    lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(lg, labels[:, 1:].reshape(-1), ignore_index=-100, reduction=reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``(1−α)·CE + α·KL(softmax(z_t/τ) ‖ softmax(z_s))``, both per token, averaged over tokens whose label is
    not -100.

    The temperature divides the *teacher* logits only (SDMPrune's choice): the student is trained towards a
    sharpened (τ < 1) teacher distribution. The KL is over next-token positions, like the cross-entropy.
    """
    ce = next_token_ce(student_logits, labels) if alpha < 1 else student_logits.new_zeros(())
    if alpha == 0 or teacher_logits is None:
        if alpha > 0:
            raise ValueError("alpha > 0 needs teacher logits")
        return ce
    valid = labels[:, 1:] != -100
    log_ps = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
    log_pt = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    kl = (kl * valid).sum() / valid.sum().clamp_min(1)
    return (1 - alpha) * ce + alpha * kl


def check_distillation_gradient(alpha: float, temperature: float, masks: MaskSet | None, model=None) -> None:
    """Refuse a loss whose gradient is identically zero: KL alone at τ = 1 while the student equals the teacher."""
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


def collect_gradients(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    collector: GradientCollector,
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    masks: MaskSet | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> GradientCollector:
    """Backward once per sequence and feed ``collector``; weights are not changed.

    With ``alpha > 0`` the teacher is the same model with the masks lifted (``masks`` must have been applied with
    ``keep_original=True``; with no masks at all the teacher is the model itself): no second copy is held.
    Only the parameters the collector reads require gradients during the pass.
    """
    check_distillation_gradient(alpha, temperature, masks, model)
    if alpha > 0 and masks is not None and len(masks) and not masks.has_original:
        raise ValueError(
            "alpha>0 needs the original weights for the teacher, but these masks were applied without "
            "keep_original=True. HINT: apply the masks with MaskSet.apply(model, keep_original=True)."
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    wanted = set(collector.params) | set(collector._group_params)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
        p.grad = None
    try:
        for ids in tqdm(iter_sequences(calibration), desc="gradients", unit="seq", disable=not progress):
            ids = ids.to(device)
            teacher = None
            if alpha > 0 and masks is not None and masks.has_original:
                # before the student's forward: lifting writes the weights that backward will read
                with torch.no_grad(), masks.lifted(model):
                    teacher = model(input_ids=ids, use_cache=False).logits
            logits = model(input_ids=ids, use_cache=False).logits
            if alpha > 0 and teacher is None:  # nothing pruned yet: the teacher is the student itself
                teacher = logits.detach()
            loss = distillation_loss(logits, ids, teacher, alpha, temperature)
            loss.backward()
            collector.update()
            for p in model.parameters():
                p.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.train(was_training)
    return collector
