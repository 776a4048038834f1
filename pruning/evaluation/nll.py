"""The one computation behind every perplexity: the summed next-token NLL and the number of scored tokens.

``perplexity`` / ``score_windows`` / ``evaluate_perplexity`` (:mod:`pruning.evaluation.perplexity`), the torchmetrics
``PerplexityMetric`` (and through it the LightningModule's validation) and the ``PruningReport`` callback's held-out
NLL all call :func:`next_token_nll` per batch. The NLL of each token is computed in float32 from the logits (half
precision logits lose whole digits of a log-probability) and the sums are kept in float64 (a float32 running sum of
millions of tokens drifts in its last digits), so the same windows give the same number whichever path scores them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..options import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "all_reduce_sums", "next_token_nll", "summed_nll"]


def next_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ NLL, scored tokens)`` of one batch, as float32 and int64 0-dim tensors on the logits' device.

    ``logits`` ``[batch, seq, vocab]``, ``labels`` ``[batch, seq]`` *unshifted*, as a Hugging Face causal LM's
    ``labels``: position ``t``'s logits predict ``labels[t + 1]``; labels equal to ``ignore_index`` are not scored."""
    target = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    return nll, (target != ignore_index).sum()


@torch.no_grad()
def summed_nll(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str | None = None
) -> tuple[float, int]:
    """``(Σ NLL, scored tokens)`` of ``model`` over ``batches``: dicts of ``input_ids``, optional ``labels`` (default:
    ``input_ids``, every token after the first scored) and optional ``attention_mask``. The model runs in eval mode
    (its training mode is restored); inputs go to ``device`` (default: the model's first parameter's)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            labels = batch.get("labels", batch["input_ids"])
            mask = batch.get("attention_mask")
            kwargs = {"attention_mask": mask.to(device)} if mask is not None else {}
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits
            batch_nll, batch_tokens = next_token_nll(logits, labels)
            nll += batch_nll.double().cpu()
            tokens += int(batch_tokens)
    finally:
        model.train(was)
    return float(nll), tokens


def all_reduce_sums(nll: float, tokens: int, device: torch.device | str | None = None) -> tuple[float, int]:
    """The sums over every rank of the default process group (as given without one); the reduction runs on the CPU
    for gloo, else on ``device``. Every rank must call this."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return nll, tokens
    on = torch.device("cpu") if dist.get_backend() == "gloo" else device
    both = torch.tensor([nll, float(tokens)], dtype=torch.float64, device=on)
    dist.all_reduce(both)
    return float(both[0]), int(both[1])
