"""Instruction-tuning rows in the Stanford Alpaca prompt: ``(prompt, response)`` documents for recovery training."""

from __future__ import annotations

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "INSTRUCT_FIELDS", "alpaca_prompt"]

# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# Alpaca field -> column names tried in order (LaMini-instruction calls the output "response").
INSTRUCT_FIELDS = {"instruction": ("instruction",), "input": ("input",), "output": ("output", "response")}


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one example (the variant with ``### Input:`` only when ``input`` is non-empty)."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
