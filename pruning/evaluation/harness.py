"""EleutherAI's lm-eval harness, in-process, on the model in memory.

The model object (masked or physically pruned, student or teacher) is wrapped in lm-eval's own Hugging Face wrapper
(``lm_eval.models.huggingface.HFLM(pretrained=<model>)``) and evaluated with ``lm_eval.simple_evaluate``: no fork of
the harness, nothing saved to disk first. Task names resolve against lm-eval's task index plus the local tasks shipped
in ``pruning/evaluation/tasks`` (``stdlib_mc``: offline, data included) and any ``include_path`` given.

Which number is reported per task (``PAPER_METRIC``) follows the pruning papers' tables (LLM-Pruner, SDMPrune and the
works comparing with them): ``acc_norm`` (length-normalised log-likelihood) wherever lm-eval has it, i.e. PIQA,
HellaSwag, ARC-easy, ARC-challenge and OpenBookQA; ``acc`` for BoolQ and WinoGrande, whose choices are single
words / whole-sentence substitutions without a normalised variant. The table says which metric each number is.

``lm_eval`` is imported only inside the functions that need it (``pip install -e ".[eval]"``); :func:`byte_tokenizer`
(from :mod:`pruning.text.tokens`, re-exported here) needs only ``tokenizers`` and ``transformers``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..text.tokens import BYTE_EOS_ID, byte_tokenizer
from .tasks import TASKS_DIR

__all__ = [
    "BYTE_EOS_ID",
    "DEFAULT_TASKS",
    "LOCAL_TASKS",
    "PAPER_METRIC",
    "TASKS_DIR",
    "HarnessResult",
    "byte_tokenizer",
    "evaluate_tasks",
    "hflm",
    "known_tasks",
    "markdown_table",
    "result_rows",
    "task_manager",
    "tokenizer_for",
]

#: The zero-shot suite of the pruning papers (lm-eval task names; hub datasets, so not runnable offline).
DEFAULT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

#: Tasks shipped in ``pruning/evaluation/tasks`` (offline; data included).
LOCAL_TASKS = ("stdlib_mc",)

#: The metric reported per task (papers' convention, see the module docstring); others: ``acc_norm`` if lm-eval
#: reports it, else ``acc``, else the first metric.
PAPER_METRIC = {
    "boolq": "acc",
    "winogrande": "acc",
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "stdlib_mc": "acc",  # choices of equal length: acc == acc_norm
}


def tokenizer_for(model: nn.Module, tokenizer: Any = None):
    """``tokenizer`` as given (a tokenizer object, a name/path, or ``"bytes"``), else the byte tokenizer for a model
    with a 256-entry vocabulary; anything else without a tokenizer is an error with a hint."""
    if tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "bytes"):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if tokenizer == "bytes" or vocab == 256:
            return byte_tokenizer()
        raise ValueError(
            f"no tokenizer for a model with vocab_size={vocab}. HINT: pass tokenizer= (a name, a path or "
            "a tokenizer object); byte-level models (vocab 256) use pruning.evaluation.harness.byte_tokenizer()"
        )
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


# --------------------------------------------------------------------------------------------------------------------
# lm-eval glue
# --------------------------------------------------------------------------------------------------------------------


def _include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[str]:
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    return [str(TASKS_DIR)] + [str(Path(p).expanduser().resolve()) for p in extra]


def task_manager(tasks: Sequence[str] = (), include_path: str | Path | Sequence[str | Path] | None = None):
    """lm-eval's ``TaskManager`` over the local tasks (``pruning/evaluation/tasks`` + ``include_path``) and, unless
    every task
    in ``tasks`` is local, lm-eval's own task index (indexing it takes ~10 s, so local-only runs skip it)."""
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    local = TaskManager(include_path=paths, include_defaults=False)
    if tasks and all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=paths, include_defaults=True)


def known_tasks(names: Sequence[str], include_path=None) -> dict[str, bool]:
    """Whether each name is a task, group or tag of lm-eval's index (+ local tasks), without loading any data."""
    tm = task_manager((), include_path)
    return {n: n in tm.all_tasks for n in names}


def hflm(
    model: nn.Module,
    tokenizer: Any = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
):
    """lm-eval's ``HFLM`` around the model object itself (no copy, no save). ``device`` moves the model first."""
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer_for(model, tokenizer),
        batch_size=batch_size,
        max_length=max_length,
        add_bos_token=add_bos_token,
    )


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """lm-eval seeds ``random``, numpy and torch globally: give a training run its generators back afterwards."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@dataclass
class HarnessResult:
    """lm-eval's results, trimmed to what is worth keeping (``results``, ``versions``, ``n-shot``, ``n-samples``,
    ``higher_is_better``, ``config`` without objects) and the reported rows."""

    results: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        return markdown_table(self.rows)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``{prefix + task/metric: value}`` of the reported rows (for a logger)."""
        return {f"{prefix}{r['task']}/{r['metric']}": r["value"] for r in self.rows}

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "lm_eval": self.results}

    def to_json(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2, default=str))
        tmp.replace(path)


_KEEP = ("results", "groups", "group_subtasks", "versions", "n-shot", "n-samples", "higher_is_better")


def _trim(raw: dict[str, Any]) -> dict[str, Any]:
    out = {k: raw[k] for k in _KEEP if k in raw}
    cfg = raw.get("config", {})
    out["config"] = {
        k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
        for k, v in cfg.items()
        if k != "model_args"
    }
    out["lm_eval_version"] = _lm_eval_version()
    return out


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def result_rows(results: dict[str, Any], metrics: str = "paper") -> list[dict[str, Any]]:
    """``[{task, metric, value, stderr, n}]`` from lm-eval's ``results`` dict: one row per task with its
    :data:`PAPER_METRIC` (``metrics="paper"``) or one per metric (``"all"``)."""
    res = results.get("results", results)
    n_samples = results.get("n-samples", {})
    rows = []
    for task, values in res.items():
        found: dict[str, tuple[float, float | None]] = {}
        for key, v in values.items():
            name, _, filt = key.partition(",")  # "acc,none": metric "acc" after filter "none"
            if not filt or name.endswith("_stderr") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            err = values.get(f"{name}_stderr,{filt}")
            found.setdefault(name, (float(v), float(err) if isinstance(err, (int, float)) else None))
        if not found:
            continue
        if metrics == "all":
            chosen = list(found)
        else:
            want = PAPER_METRIC.get(task)
            chosen = [
                want
                if want in found
                else "acc_norm"
                if "acc_norm" in found
                else "acc"
                if "acc" in found
                else next(iter(found))
            ]
        n = n_samples.get(task, {})
        for name in chosen:
            value, err = found[name]
            rows.append(
                {
                    "task": task,
                    "metric": name,
                    "value": value,
                    "stderr": err,
                    "n": n.get("effective") if isinstance(n, dict) else None,
                }
            )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """``| task | metric | value | stderr |`` (values as fractions, 4 decimals)."""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for r in rows:
        err = "" if r.get("stderr") is None or math.isnan(r["stderr"]) else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {err} |")
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's warnings about what this use of it does on purpose (a model object instead of a name, a local task's
    custom dataset function) silenced for the call; its errors still show."""
    import logging
    from unittest import mock

    import lm_eval.evaluator
    import lm_eval.loggers.utils

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "lm_eval.models.huggingface")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    # lm-eval records `git describe` of the working directory, whose "fatal: not a git repository" would land on
    # stderr in every run outside a clone
    quiet_git = [
        mock.patch.object(m, "get_git_commit_hash", _git_hash) for m in (lm_eval.evaluator, lm_eval.loggers.utils)
    ]
    try:
        with contextlib.ExitStack() as stack:
            for patch in quiet_git:
                stack.enter_context(patch)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _git_hash() -> str | None:
    """``git describe --always`` of the working directory, or ``None`` (git's complaint not printed)."""
    import subprocess

    try:
        out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)  # noqa: S607
    except (subprocess.CalledProcessError, OSError):
        return None
    return out.strip().decode()


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any = None,
    tasks: Sequence[str] = LOCAL_TASKS,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    metrics: str = "paper",
    seed: int = 0,
    bootstrap_iters: int = 1000,
) -> HarnessResult:
    """Run lm-eval ``tasks`` on the model object in memory and return the trimmed results and reported rows.

    Args:
        model: a Hugging Face causal LM (masked or compacted; its training mode is restored afterwards).
        tokenizer: tokenizer object, name or path; ``None`` / ``"bytes"`` gives :func:`byte_tokenizer` to
            256-vocabulary models.
        tasks: lm-eval task/group names (``DEFAULT_TASKS`` needs the hub datasets), local ``LOCAL_TASKS``, or names
            from YAMLs under ``include_path``.
        limit: at most this many documents per task (a fraction if < 1): for smoke tests, not for reported numbers.
        num_fewshot: few-shot examples (default: the task's own, 0 for the suite).
        batch_size: lm-eval batch size.
        device: move the model there first (default: where it is).
        max_length: context length (default: the model config's ``max_position_embeddings``).
        add_bos_token: prepend BOS (default: what the tokenizer does by itself).
        metrics: ``paper`` (one row per task, :data:`PAPER_METRIC`) or ``all``.
        seed: lm-eval's seeds (python, numpy, torch, few-shot); the caller's generators are restored afterwards.
        bootstrap_iters: bootstrap iterations for stderrs of non-mean metrics (mean metrics have a closed form).
    """
    import lm_eval

    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    was_training = model.training
    try:
        with _rng_kept(), _quiet_lm_eval():
            lm = hflm(model, tokenizer, batch_size, device, max_length, add_bos_token)
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager(tasks, include_path),
                log_samples=False,
                bootstrap_iters=bootstrap_iters,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)
    if raw is None:  # not lm-eval's rank 0 (never the case for a model object: HFLM runs it single-process)
        return HarnessResult(results={}, rows=[])
    trimmed = _trim(dict(raw))
    return HarnessResult(results=trimmed, rows=result_rows(trimmed, metrics))
