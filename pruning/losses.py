"""The losses whose gradients score and train: next-token cross-entropy and SDMPrune's (self-)distillation loss."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .options import IGNORE_INDEX


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Shifted next-token cross-entropy in fp32; label -100 is ignored."""
    lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(lg, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | ChunkedLogits | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    fused: bool = True,
    chunk: int | None = None,
    kl_positions: KLPositions = "labelled",
) -> torch.Tensor:
    """``(1−α)·CE + α·KL(softmax(z_t/τ) ‖ softmax(z_s))``, both per token, averaged over tokens whose label is
    not -100.

    The temperature divides the *teacher* logits only (SDMPrune's choice): the student is trained towards a
    sharpened (τ < 1) teacher distribution. ``kl_positions``: ``labelled`` (default) averages the KL over the
    next-token positions the cross-entropy scores (the labels' mask applies to both); ``all`` averages it over every
    position of every sequence, the last one and unlabelled ones included — SDMPrune's code (``KL / seq_len``), a
    departure of the default from it that only changes how much the KL weighs against the CE (by about ``T/(T−1)``
    for unmasked text).

    ``fused`` (default): the loss and its gradient with respect to the student logits are computed together in the
    forward, ``chunk`` positions at a time (default: 2²² logits per chunk, e.g. 131 positions of a 32k vocabulary;
    ``∂/∂z_s = ((1−α)(p_s − onehot) + α(p_s − p_t)) / n_valid``), and only that gradient is kept for backward. A
    [positions, vocab] problem then holds the logits, the teacher's logits (or none of them, given as
    :class:`ChunkedLogits`) and one fp32 gradient instead of the ~8 fp32 [positions, vocab] tensors of the
    step-by-step formula, which keeps distillation scoring within a few percent of cross-entropy scoring in memory.
    ``fused=False`` is the plain autograd formula (the tests check the two agree).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if alpha > 0 and teacher_logits is None:
        raise ValueError("alpha > 0 needs teacher logits")
    if kl_positions not in ("labelled", "all"):
        raise ValueError(f"kl_positions={kl_positions!r} must be 'labelled' or 'all'")
    if kl_positions == "all" and alpha > 0:
        return _all_positions(student_logits, labels, teacher_logits, alpha, temperature, fused, chunk)
    if fused:
        chunk = chunk or max(1, (1 << 22) // student_logits.shape[-1])
        return _FusedDistillation.apply(
            student_logits, labels, teacher_logits if alpha > 0 else None, float(alpha), float(temperature), int(chunk)
        )
    if isinstance(teacher_logits, ChunkedLogits):
        teacher_logits = teacher_logits.full()
    ce = next_token_ce(student_logits, labels) if alpha < 1 else student_logits.new_zeros(())
    if alpha == 0 or teacher_logits is None:
        return ce
    valid = labels[:, 1:] != IGNORE_INDEX
    log_ps = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
    log_pt = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    kl = (kl * valid).sum() / valid.sum().clamp_min(1)
    return (1 - alpha) * ce + alpha * kl


def _all_positions(student, labels, teacher, alpha: float, temperature: float, fused: bool, chunk) -> torch.Tensor:
    """``(1−α)·CE`` over the labelled next-token positions plus ``α·KL`` averaged over every position (see
    :func:`distillation_loss`): the KL term is the fused loss at α = 1 with every position labelled and one more
    position appended (the last one has no next token, but a KL), re-weighted by the count of positions."""
    ce = distillation_loss(student, labels, None, 0.0, temperature, fused, chunk) if alpha < 1 else 0.0
    if isinstance(teacher, ChunkedLogits):
        teacher = teacher.full()
    b, t = student.shape[:2]
    pad = student.new_zeros((b, 1, student.shape[-1]))
    everywhere = torch.zeros((b, t + 1), dtype=torch.long, device=student.device)  # every position "labelled"
    kl = distillation_loss(
        torch.cat([student, pad], 1), everywhere, torch.cat([teacher, pad.to(teacher.dtype)], 1), 1.0, temperature,
        fused, chunk,
    )  # fmt: skip
    return (1 - alpha) * ce + alpha * kl


KLPositions = Literal["labelled", "all"]


class ChunkedLogits:
    """Teacher logits produced a block of positions at a time from the final hidden states and the LM head
    (``logits = head(hidden)``), so the teacher's full [positions, vocab] tensor never exists."""

    def __init__(self, hidden: torch.Tensor, head: nn.Module) -> None:
        self.hidden, self.head = hidden, head

    def chunk(self, b: int, lo: int, hi: int) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.hidden[b, lo:hi])

    def full(self) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.hidden)


class _FusedDistillation(torch.autograd.Function):
    """Loss and ∂loss/∂z_s in one chunked pass; backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, student, labels, teacher, alpha, temperature, chunk):  # type: ignore[override]
        target_all = labels[:, 1:].to(student.device)
        n = (target_all != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
        grad = torch.zeros(student.shape, dtype=torch.float32, device=student.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        positions = student.shape[1] - 1
        for b in range(student.shape[0]):
            for lo in range(0, positions, chunk):
                hi = min(lo + chunk, positions)
                target = target_all[b, lo:hi]
                ok = target != IGNORE_INDEX
                tgt = target.clamp_min(0)[:, None]
                log_ps = F.log_softmax(student[b, lo:hi].float(), dim=-1)
                g = grad[b, lo:hi]  # a view: the chunk's gradient is written in place
                g.copy_(log_ps.exp())  # p_s
                if alpha < 1:
                    ce_sum -= (log_ps.gather(1, tgt).squeeze(1) * ok).sum(dtype=torch.float64)
                if teacher is not None:
                    zt = teacher.chunk(b, lo, hi) if isinstance(teacher, ChunkedLogits) else teacher[b, lo:hi]
                    log_pt = F.log_softmax(zt.float() / temperature, dim=-1)
                    del zt
                    pt = log_pt.exp()
                    kl_sum += ((pt * (log_pt - log_ps)).sum(-1) * ok).sum(dtype=torch.float64)
                    g.sub_(pt, alpha=alpha)  # (1−α)·p_s + α·p_s − α·p_t
                    del log_pt, pt
                if alpha < 1:
                    g.scatter_add_(1, tgt, torch.full_like(tgt, -(1 - alpha), dtype=g.dtype))
                g.mul_((ok.to(g.dtype) / n)[:, None])
                del log_ps
        ctx.save_for_backward(grad)
        ctx.dtype = student.dtype
        return (((1 - alpha) * ce_sum + alpha * kl_sum) / n.double()).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out).to(ctx.dtype), None, None, None, None, None
