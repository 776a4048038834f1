"""Self-Pruner's language-model operators: the four genetic operators of its Alg. 1 (initialisation, parent selection,
crossover, mutation) asked of a language model by prompt, the parsers of its answers, and the models that answer —
a local Hugging Face causal LM (:class:`LocalCausalLM`) or any OpenAI-compatible chat-completions endpoint the user
configures (:class:`ChatEndpoint`, standard library HTTP only). Nothing here is needed offline: without an operator
model the search runs its classical operators."""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from typing import Literal, Protocol

import torch

from ..loading import from_pretrained

Rates = Sequence[float]  # one rate per decoder layer
Scored = tuple[list[float], float]  # rates and their fitness
OperatorKind = Literal["initialisation", "selection", "crossover", "mutation"]
LLM_OPERATORS: tuple[str, ...] = ("initialisation", "selection", "crossover", "mutation")

_LIST = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


# ---------------------------------------------------------------------------------------------- parsing answers
def _rate_list(body: str, n_layers: int) -> tuple[list[float] | None, str]:
    nums = _NUMBER.findall(body)
    if not nums:
        return None, "no bracketed list of numbers"
    if len(nums) != n_layers:
        return None, f"a list of {len(nums)} numbers, not {n_layers}"
    vals = [float(x) for x in nums]
    if not all(math.isfinite(v) and 0 <= v < 1 for v in vals):
        return None, "rates outside [0, 1)"
    return vals, "ok"


def parse_rates(text: str, n_layers: int) -> tuple[list[float] | None, str]:
    """The *last* bracketed list in ``text`` with one number per layer, each in ``[0, 1)`` (a chat model often
    restates the parents before its answer): ``(rates, 'ok')``, or ``(None, reason)`` when no list is usable."""
    lists, reason = parse_rate_lists(text, n_layers)
    return (lists[-1], "ok") if lists else (None, reason)


def parse_rate_lists(text: str, n_layers: int) -> tuple[list[list[float]], str]:
    """Every usable bracketed list of ``text`` (as :func:`parse_rates` reads one): ``(lists, 'ok')``, or
    ``([], reason)`` when none is usable."""
    out, reason = [], "no bracketed list of numbers"
    for body in _LIST.findall(text):
        rates, why = _rate_list(body, n_layers)
        if rates is not None:
            out.append(rates)
        elif why != "no bracketed list of numbers":
            reason = why
    return out, "ok" if out else reason


def parse_indices(text: str, count: int, size: int) -> tuple[list[int] | None, str]:
    """The *last* bracketed list of ``count`` distinct whole numbers in ``[0, size)`` (indices into the population
    the prompt listed; a chat model may name other candidates before its choice): ``(indices, 'ok')`` or
    ``(None, reason)``."""
    reason = "no bracketed list of indices"
    for body in reversed(_LIST.findall(text)):
        nums = _NUMBER.findall(body)
        if not nums:
            continue
        if len(nums) != count:
            reason = f"{len(nums)} indices, not {count}"
            continue
        vals = [float(x) for x in nums]
        if not all(v.is_integer() and 0 <= v < size for v in vals):
            reason = f"indices outside 0..{size - 1}"
            continue
        if len(set(vals)) != count:
            reason = "the same candidate twice"
            continue
        return [int(v) for v in vals], "ok"
    return None, reason


# ---------------------------------------------------------------------------------------------- the models
class TextModel(Protocol):
    """What answers the prompts: ``generate(prompt) -> answer``; ``name`` is recorded in the search history.
    ``generate`` raises :class:`OperatorModelError` when no answer could be had (the search then falls back)."""

    name: str

    def generate(self, prompt: str) -> str: ...


class OperatorModelError(RuntimeError):
    """The operator model could not answer (an HTTP error, a timeout, a malformed response)."""


class LocalCausalLM:
    """A local Hugging Face causal LM (safetensors only, no remote code). Generation is sampled (``temperature``,
    ``top_p``), at most ``max_new_tokens`` tokens (default: enough for the answer asked, :func:`answer_tokens`),
    seeded per call with the global random state left untouched. A chat template is used when the tokenizer has one;
    a prompt longer than the model's context keeps its end (the question and the answer format)."""

    def __init__(
        self,
        path: str,
        max_new_tokens: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.95,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        from transformers import AutoTokenizer

        self.name = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = from_pretrained(path, key="operator_model").eval()
        if device is not None:
            self.model.to(device)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if max_new_tokens is not None and (max_new_tokens < 1 or (limit is not None and max_new_tokens >= limit)):
            raise ValueError(
                f"operator max_new_tokens={max_new_tokens} must be between 1 and the model's context "
                f"({limit} positions) minus the prompt. HINT: leave it unset (enough for the answer asked)"
            )
        self.max_new_tokens = max_new_tokens
        self.answer_budget = 256  # set per prompt by LLMOperator; used when max_new_tokens is None
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.calls = 0

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
        new = self.max_new_tokens or self.answer_budget
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + new > limit:
            new = min(new, limit // 2)  # an answer this long does not fit: half the context, the prompt's end kept
            ids = ids[:, -(limit - new) :]  # keep the end: the question and the answer format
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
                max_new_tokens=new,
                pad_token_id=pad if pad is not None else 0,
            )
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_RESPONSE_BYTES = 1 << 20  # an operator's answer is a few lists of rates; a larger response is refused


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib's hook)
        raise OperatorModelError(f"endpoint error: HTTP {code} redirect refused (point the URL at the server itself)")


def _read_within(response, seconds: float, limit: int) -> bytes:
    """The response body, read in chunks within ``seconds`` in all (a socket timeout bounds each read only: a
    server trickling bytes would hold the search forever) and at most ``limit`` bytes."""
    deadline, chunks, size = time.monotonic() + seconds, [], 0
    read = getattr(response, "read1", response.read)  # read1: what has arrived, not a full chunk
    while chunk := read(65536):
        size += len(chunk)
        if size > limit:
            raise OperatorModelError(f"endpoint error: response larger than {limit} bytes")
        if time.monotonic() > deadline:
            raise OperatorModelError(f"endpoint error: response not complete within {seconds:g} s")
        chunks.append(chunk)
    return b"".join(chunks)


class ChatEndpoint:
    """Any OpenAI-compatible chat-completions endpoint (a hosted model, vLLM, llama.cpp's server, ...), over the
    standard library's ``urllib``.

    ``url``: the API base (``http://localhost:8000/v1``; ``/chat/completions`` is appended unless the URL already
    ends with it); ``model``: the model name the server expects; ``api_key_env``: the *name* of an environment
    variable holding the key, sent as ``Authorization: Bearer ...`` (none: no header, as local servers need none).
    Each prompt is one user message; the answer is ``choices[0].message.content``. Any failure (HTTP status,
    network, timeout, malformed JSON) raises :class:`OperatorModelError`, which the search counts as a fallback.
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.7,
        timeout: float = 60.0,
    ) -> None:
        parts = urllib.parse.urlparse(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"operator endpoint url={url!r} must be an http(s) URL, e.g. http://localhost:8000/v1")
        if parts.username or parts.password:
            raise ValueError("operator endpoint url: no credentials in the URL. HINT: put the key in api_key_env")
        if not timeout > 0:
            raise ValueError(f"operator endpoint timeout={timeout!r} must be > 0 seconds")
        path = parts.path.rstrip("/")
        path = path if path.endswith("/chat/completions") else path + "/chat/completions"
        self.url = urllib.parse.urlunparse(parts._replace(path=path, fragment=""))
        self.model = model
        # what is recorded (search history, quality.json): no query string, where tokens sometimes ride
        self.name = f"{model} @ {parts.scheme}://{parts.netloc}{path}"
        self.api_key_env = api_key_env
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(
                f"api_key_env={api_key_env!r}: the environment variable is not set. HINT: export {api_key_env}=... "
                "or leave api_key_env unset for a server that needs no key"
            )
        if api_key_env is not None and parts.scheme == "http" and parts.hostname not in _LOCAL_HOSTS:
            raise ValueError(
                f"operator endpoint url={self.name.split(' @ ')[1]}: the key would travel unencrypted to another "
                "host. HINT: use https:// (or a server on localhost)"
            )
        self.max_tokens = max_tokens
        self.answer_budget = 512  # set per prompt by LLMOperator; used when max_tokens is None
        self.temperature = temperature
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirect)

    def generate(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens or self.answer_budget,
            "temperature": self.temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            # redirects are refused (urllib would resend the Authorization header to wherever they point)
            with self._opener.open(request, timeout=self.timeout) as response:  # noqa: S310 (scheme checked)
                data = json.loads(_read_within(response, self.timeout, MAX_RESPONSE_BYTES).decode("utf-8"))
            return str(data["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as e:
            raise OperatorModelError(f"endpoint error: HTTP {e.code}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise OperatorModelError(f"endpoint error: {type(e).__name__}") from e
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise OperatorModelError("endpoint error: malformed response") from e


# ---------------------------------------------------------------------------------------------- the operator
class LLMOperator:
    """Self-Pruner's operators asked of a language model, as the paper does with GPT-4 (its Alg. 1).

    ``model``: a :class:`TextModel` (:class:`ChatEndpoint`, a scripted one in tests), or the path of a local causal
    LM (then ``local_options`` go to :class:`LocalCausalLM`). Every prompt casts the model as an expert in LLM
    pruning, explains the encoding (rate ``r_i``: the fraction of layer ``i``'s structures removed), states the
    constraint (mean = target, range) and that lower perplexity is better, lists the candidates with their
    perplexity, names the operation and the exact answer format:

    - initialisation: ``count`` diverse new lists, one ``[r1, ..., rL]`` per line;
    - selection: the whole population numbered from 0 (best first), asked for the indices of the parents, ``[i, j]``
      for a crossover, ``[i]`` for a mutation;
    - crossover: the ``shown`` best, then the two parents, asked for one child ``[r1, ..., rL]``;
    - mutation: the ``shown`` best, then the parent, asked for one mutant.

    Each method returns what it parsed (``None`` / ``[]`` when unusable), the reason and the raw answer; the caller
    repairs lists into the constraint and falls back to its classical operator when nothing is usable.
    """

    def __init__(self, model: str | TextModel, *, shown: int = 10, **local_options) -> None:
        self.model: TextModel = LocalCausalLM(model, **local_options) if isinstance(model, str) else model
        self.path = self.model.name
        self.shown = shown

    def generate(self, prompt: str, lists: int, n_layers: int) -> tuple[str, str | None]:
        """``(answer, None)``, or ``('', reason)`` when the model could not answer. A model with an
        ``answer_budget`` is told how long an answer of ``lists`` lists of ``n_layers`` rates is."""
        if hasattr(self.model, "answer_budget"):
            self.model.answer_budget = answer_tokens(lists, n_layers)
        try:
            return self.model.generate(prompt), None
        except OperatorModelError as e:
            return "", str(e)

    # ---- prompts
    @staticmethod
    def _preamble(n: int, target: float, max_rate: float) -> list[str]:
        return [
            f"You are an expert in pruning large language models. A model with {n} decoder layers is pruned layer "
            f"by layer: rate r_i is the fraction of layer i's structures that are removed. The average of the {n} "
            f"rates must be {target:.4f} and every rate must be between 0 and {max_rate:.2f}. The pruned model is "
            "scored by its perplexity on held-out text: lower perplexity is better.",
        ]

    def _listing(self, population: Sequence[Scored], numbered: bool = False, limit: int | None = None) -> list[str]:
        shown = sorted(population, key=lambda c: c[1])[:limit]
        if numbered:
            return [f"{i}: {_fmt(r)} perplexity: {f:.4f}" for i, (r, f) in enumerate(shown)]
        return [f"{_fmt(r)} perplexity: {f:.4f}" for r, f in shown]

    def prompt(
        self, kind: str, parents: Sequence[Rates], population: Sequence[Scored], target: float, max_rate: float
    ) -> str:
        """The crossover or mutation prompt."""
        n = len(parents[0])
        lines = self._preamble(n, target, max_rate)
        lines.append("Here are pruning-rate lists found so far with their perplexity:")
        lines += self._listing(population, limit=self.shown)
        if kind == "crossover":
            lines.append(
                f"Combine the two parents {_fmt(parents[0])} and {_fmt(parents[1])} by crossover into one "
                "new list that should have a lower perplexity."
            )
        else:
            lines.append(f"Mutate the parent {_fmt(parents[0])} into one new list that should have a lower perplexity.")
        lines.append(f"Answer with the new list only, {n} numbers in square brackets: [r1, r2, ..., r{n}]")
        return "\n".join(lines)

    def initialisation_prompt(self, count: int, n: int, target: float, max_rate: float) -> str:
        lines = self._preamble(n, target, max_rate)
        lines.append(
            f"Generate the initial population of an evolutionary search: {count} different pruning-rate lists that "
            "you expect to give a low perplexity, diverse enough to explore the search space (for example, layers "
            "near the input and the output are often more sensitive than those in the middle)."
        )
        lines.append(
            f"Answer with {count} lists only, one per line, each {n} numbers in square brackets: [r1, ..., r{n}]"
        )
        return "\n".join(lines)

    def selection_prompt(
        self, population: Sequence[Scored], count: int, purpose: str, target: float, max_rate: float
    ) -> str:
        n = len(population[0][0])
        lines = self._preamble(n, target, max_rate)
        lines.append(f"The current population, numbered from 0, best first ({len(population)} candidates):")
        lines += self._listing(population, numbered=True)
        if count == 2:
            lines.append(
                f"Select two parents for a {purpose} whose child is likely to have a lower perplexity than both. "
                "Answer with their two numbers only, in square brackets: [i, j]"
            )
        else:
            lines.append(
                f"Select one parent for a {purpose} that is likely to lead to a lower perplexity. Answer with its "
                "number only, in square brackets: [i]"
            )
        return "\n".join(lines)

    # ---- the four operators
    def propose(
        self, kind: str, parents: Sequence[Rates], population: Sequence[Scored], target: float, max_rate: float
    ) -> tuple[list[float] | None, str, str]:
        """``(rates or None, reason, answer)`` for one crossover or mutation."""
        answer, error = self.generate(self.prompt(kind, parents, population, target, max_rate), 1, len(parents[0]))
        if error is not None:
            return None, error, answer
        rates, reason = parse_rates(answer, len(parents[0]))
        return rates, reason, answer

    def initialise(
        self, count: int, n_layers: int, target: float, max_rate: float
    ) -> tuple[list[list[float]], str, str]:
        """``(lists, reason, answer)``: the usable lists of one initialisation answer (possibly fewer than asked)."""
        answer, error = self.generate(self.initialisation_prompt(count, n_layers, target, max_rate), count, n_layers)
        if error is not None:
            return [], error, answer
        lists, reason = parse_rate_lists(answer, n_layers)
        return lists[:count], reason, answer

    def select(
        self, population: Sequence[Scored], count: int, purpose: str, target: float, max_rate: float
    ) -> tuple[list[int] | None, str, str]:
        """``(indices or None, reason, answer)``: ``count`` parents, as indices into ``population`` sorted by
        fitness (best first), the numbering of the prompt."""
        answer, error = self.generate(self.selection_prompt(population, count, purpose, target, max_rate), 1, count)
        if error is not None:
            return None, error, answer
        idx, reason = parse_indices(answer, count, len(population))
        return idx, reason, answer


def warn_if_mostly_classical(used: int, asked: int, failures: dict) -> None:
    """Warn when the operator model's answers were unusable more often than not (the search was then mostly the
    classical one, which its record would not make obvious)."""
    if asked and used < asked / 2:
        warnings.warn(
            f"Self-Pruner: the operator model gave a usable answer {used} times out of {asked}; the classical "
            f"operators stood in for the rest (reasons: {failures}). HINT: a larger or instruction-tuned operator "
            "model, or no operator model (the classical search)",
            stacklevel=3,
        )


def answer_tokens(lists: int, n_layers: int) -> int:
    """Tokens enough for an answer of ``lists`` bracketed lists of ``n_layers`` numbers, even with a byte-level
    tokenizer ("0.250, " is 7 bytes), plus room for a short preamble."""
    return 64 + lists * (8 * n_layers + 8)


def _fmt(rates: Sequence[float]) -> str:
    return "[" + ", ".join(f"{r:.3f}" for r in rates) + "]"
