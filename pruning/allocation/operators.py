"""Self-Pruner's language-model operator: a causal LM asked, by prompt, for crossover and mutation of layer-rate
lists, and the parser that reads its answer."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from ..loading import from_pretrained

Rates = Sequence[float]  # one rate per decoder layer
Scored = tuple[list[float], float]  # rates and their fitness

_LIST = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def parse_rates(text: str, n_layers: int) -> tuple[list[float] | None, str]:
    """The first bracketed list in ``text`` with one number per layer, each in ``[0, 1)``: ``(rates, 'ok')``, or
    ``(None, reason)`` when no list in the answer is usable."""
    reason = "no bracketed list of numbers"
    for body in _LIST.findall(text):
        nums = _NUMBER.findall(body)
        if not nums:
            continue
        if len(nums) != n_layers:
            reason = f"a list of {len(nums)} numbers, not {n_layers}"
            continue
        vals = [float(x) for x in nums]
        if not all(math.isfinite(v) and 0 <= v < 1 for v in vals):
            reason = "rates outside [0, 1)"
            continue
        return vals, "ok"
    return None, reason


class LLMOperator:
    """A local Hugging Face causal LM asked to do crossover and mutation, as Self-Pruner does with GPT-4.

    The prompt lists the best candidates of the population with their perplexity (lower is better), states the
    constraint (mean rate, range) and the operator, names the parent(s) and asks for one new list
    ``[r1, ..., rL]``. Generation is sampled (``temperature``, ``top_p``), at most ``max_new_tokens`` tokens, with
    the global random state left untouched. A chat template is used when the tokenizer has one.
    """

    def __init__(
        self,
        path: str,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        shown: int = 10,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = from_pretrained(path, key="operator_model").eval()
        if device is not None:
            self.model.to(device)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.shown = shown
        self.seed = seed
        self.calls = 0

    def prompt(
        self, kind: str, parents: Sequence[Rates], population: Sequence[Scored], target: float, max_rate: float
    ) -> str:
        n = len(parents[0])
        shown = sorted(population, key=lambda c: c[1])[: self.shown]
        lines = [
            f"You are an expert in pruning large language models. A model with {n} decoder layers is pruned "
            f"layer by layer: rate r_i is the fraction of layer i's structures that are removed. The average of "
            f"the {n} rates must be {target:.4f} and every rate must be between 0 and {max_rate:.2f}. Lower "
            "perplexity is better.",
            "Here are pruning-rate lists found so far with their perplexity:",
        ]
        lines += [f"{_fmt(r)} perplexity: {f:.4f}" for r, f in shown]
        if kind == "crossover":
            lines.append(
                f"Combine the two parents {_fmt(parents[0])} and {_fmt(parents[1])} by crossover into one "
                "new list that should have a lower perplexity."
            )
        else:
            lines.append(f"Mutate the parent {_fmt(parents[0])} into one new list that should have a lower perplexity.")
        lines.append(f"Answer with the new list only, {n} numbers in square brackets: [r1, r2, ..., r{n}]")
        return "\n".join(lines)

    @torch.no_grad()
    def generate(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt + "\n"
        ids = tok(text, return_tensors="pt").input_ids
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + self.max_new_tokens > limit:
            ids = ids[:, -(limit - self.max_new_tokens) :]  # keep the end: the question and the answer format
        ids = ids.to(self.model.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.calls += 1
        dev = self.model.device
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed * 100003 + self.calls)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad if pad is not None else 0,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def propose(
        self, kind: str, parents: Sequence[Rates], population: Sequence[Scored], target: float, max_rate: float
    ) -> tuple[list[float] | None, str, str]:
        """``(rates or None, reason, answer)`` for one crossover or mutation."""
        answer = self.generate(self.prompt(kind, parents, population, target, max_rate))
        rates, reason = parse_rates(answer, len(parents[0]))
        return rates, reason, answer


def _fmt(rates: Sequence[float]) -> str:
    return "[" + ", ".join(f"{r:.3f}" for r in rates) + "]"
