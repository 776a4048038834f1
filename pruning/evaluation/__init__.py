"""Evaluation of the model being pruned: perplexity under a recorded protocol, the torchmetrics metric (both, and
every other perplexity of the project, summing one next-token NLL: :mod:`.nll`), and EleutherAI's lm-eval harness
in-process (with the offline tasks shipped in ``tasks/``)."""

from .nll import next_token_nll, summed_nll
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
    "next_token_nll",
    "perplexity",
    "summed_nll",
    "token_stream",
]
