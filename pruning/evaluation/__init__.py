"""Evaluation of the model being pruned: perplexity under a recorded protocol, the torchmetrics metric, and
EleutherAI's lm-eval harness in-process (with the offline tasks shipped in ``tasks/``)."""

from .perplexity import (
    IGNORE_INDEX,
    PRESETS,
    PerplexityProtocol,
    PerplexityResult,
    evaluate_perplexity,
    perplexity,
    token_stream,
)

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "PerplexityProtocol",
    "PerplexityResult",
    "evaluate_perplexity",
    "perplexity",
    "token_stream",
]
