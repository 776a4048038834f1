"""``PerplexityMetric``: token-weighted perplexity as a torchmetrics ``Metric`` (usable inside validation loops).

The only module of the core that imports torchmetrics (``pip install -e ".[lightning]"``); the rest of ``pruning``
needs torch and transformers only.
"""

from __future__ import annotations

import torch
import torchmetrics

from .nll import IGNORE_INDEX, next_token_nll

__all__ = ["PerplexityMetric"]


class PerplexityMetric(torchmetrics.Metric):
    """``exp(Σ NLL / Σ tokens)`` over every ``update``, synchronised across ranks (the sums are all-reduced, so two
    processes on halves of the data give the perplexity of one process on all of it).

    ``update(logits, labels)`` takes ``[batch, seq, vocab]`` logits and ``[batch, seq]`` labels *unshifted*, as a
    Hugging Face causal LM's ``labels``: position ``t``'s logits predict ``labels[t + 1]``; labels equal to
    ``ignore_index`` (−100) are not scored. NLL is computed in float32 from the logits and summed in float64
    (:func:`pruning.evaluation.nll.next_token_nll`, as every perplexity of the project).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    nll_sum: torch.Tensor
    token_count: torch.Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("token_count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        nll, tokens = next_token_nll(logits, labels, self.ignore_index)
        self.nll_sum += nll.detach().to(self.nll_sum.dtype)
        self.token_count += tokens.to(self.token_count.dtype)

    def compute(self) -> torch.Tensor:
        """The perplexity (``nan`` before any scored token)."""
        if self.token_count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return torch.exp(self.nll_sum / self.token_count)

    def mean_nll(self) -> torch.Tensor:
        """``Σ NLL / Σ tokens`` of the local (unsynchronised) state."""
        return self.nll_sum / self.token_count.clamp(min=1)

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ NLL, Σ tokens)`` over every rank (float64; the local state is left as it was)."""
        with self.sync_context():
            return self.nll_sum.clone(), self.token_count.clone()
