"""Perplexity and lm-eval numbers of the model being pruned, in the same run: dense, pruned, recovered."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from pruning.evaluation.perplexity import PerplexityProtocol, evaluate_perplexity, token_stream

from .export import find_hf_model

WHEN = ("fit_start", "after_pruning", "fit_end")


class EvaluationCallback(pl.Callback):
    """Evaluates the LightningModule's Hugging Face model (``model_attr``, else ``.student``, else ``.model``) with
    :func:`pruning.evaluation.evaluate_perplexity` and/or lm-eval
    (:func:`pruning.evaluation.harness.evaluate_tasks`, on the
    model object in memory: nothing is written) at the moments in ``when``:

    - ``fit_start``: before the first training step, i.e. the dense model (the baseline, in the same run);
    - ``after_pruning``: right after the last event of the :class:`pruning.callbacks.PruningCallback` in
      ``trainer.callbacks``
      (before any recovery step changes the weights);
    - ``fit_end``: the recovered model.

    Logs ``eval/<when>/ppl`` and ``eval/<when>/<task>/<metric>`` through ``trainer.logger``, prints a table
    (one column per moment) on rank 0 at the end of fit and writes ``path`` (JSON: every result with its protocol and
    lm-eval's trimmed output) if given. Perplexity windows are shared among the ranks (the sums are all-reduced);
    lm-eval runs on global rank 0 while the others wait.

    The tokenizer is the module's ``tokenizer`` attribute, or :func:`pruning.text.tokens.byte_tokenizer`
    (perplexity:
    ``"bytes"``) for a model with a 256-entry vocabulary.

    Args:
        perplexity: protocol fields (:class:`pruning.evaluation.PerplexityProtocol`), e.g. ``{preset: stdlib}`` or
            ``{source: wikitext, dataset_config: wikitext-2-raw-v1, split: test, seq_len: 2048}``; null: none.
        tasks: lm-eval task names (e.g. ``[stdlib_mc]`` offline, or the papers' suite
            ``[boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa]``); null: none.
        when: any of ``fit_start``, ``after_pruning``, ``fit_end``.
        limit: at most this many documents per lm-eval task (smoke runs).
        num_fewshot: lm-eval few-shot examples (default: the task's own).
        batch_size: windows per forward (perplexity) and lm-eval batch size.
        include_path: extra directories of lm-eval task YAMLs.
        path: JSON output (rank 0).
        model_attr: attribute of the LightningModule holding the Hugging Face model.
    """

    def __init__(
        self,
        perplexity: dict[str, Any] | None = None,
        tasks: list[str] | None = None,
        when: list[Literal["fit_start", "after_pruning", "fit_end"]] | None = None,
        limit: int | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        include_path: list[str] | None = None,
        path: str | None = None,
        model_attr: str | None = None,
    ) -> None:
        if perplexity is None and not tasks:
            raise ValueError(
                "EvaluationCallback: nothing to evaluate. HINT: set perplexity: {preset: stdlib} and/or "
                "tasks: [stdlib_mc]"
            )
        self.protocol = PerplexityProtocol.from_dict(perplexity) if perplexity is not None else None
        self.tasks = list(tasks or [])
        self.when = list(when) if when is not None else ["fit_end"]
        bad = [w for w in self.when if w not in WHEN]
        if bad:
            raise ValueError(f"EvaluationCallback: when={bad} not among {list(WHEN)}")
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.include_path = list(include_path or [])
        self.path = Path(path) if path else None
        self.model_attr = model_attr
        self.results: dict[str, dict[str, Any]] = {}
        self._stream: torch.Tensor | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _pruner(trainer: pl.Trainer):
        return next(
            (c for c in trainer.callbacks if hasattr(c, "done") and hasattr(getattr(c, "schedule", None), "plan")), None
        )

    def _tokenizer(self, pl_module: pl.LightningModule, model) -> Any:
        tok = getattr(pl_module, "tokenizer", None)
        if tok is not None and not (isinstance(tok, str) and tok == "bytes"):
            return tok
        if getattr(model.config, "vocab_size", None) == 256 or tok == "bytes":
            return None  # byte-level
        raise ValueError(
            f"EvaluationCallback: {type(pl_module).__name__} has no `tokenizer` and the model's "
            f"vocabulary ({model.config.vocab_size}) is not byte-level. HINT: set model.tokenizer"
        )

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, moment: str) -> dict[str, Any]:
        """Evaluate now and record / log the numbers under ``moment`` (every rank must call this)."""
        model = find_hf_model(pl_module, self.model_attr)
        tok = self._tokenizer(pl_module, model)
        row: dict[str, Any] = {"step": trainer.global_step}
        metrics: dict[str, float] = {}
        if self.protocol is not None:
            if self._stream is None:
                self._stream = token_stream(self.protocol, "bytes" if tok is None else tok)
            res = evaluate_perplexity(
                model,
                "bytes" if tok is None else tok,
                self.protocol,
                self.batch_size,
                pl_module.device,
                distributed=True,
                stream=self._stream,
            )
            row["perplexity"] = res.as_dict()
            metrics["ppl"] = res.ppl
        if self.tasks:
            if trainer.is_global_zero:
                from pruning.evaluation.harness import evaluate_tasks
                from pruning.text.tokens import byte_tokenizer

                out = evaluate_tasks(
                    model,
                    byte_tokenizer() if tok is None else tok,
                    self.tasks,
                    limit=self.limit,
                    num_fewshot=self.num_fewshot,
                    batch_size=self.batch_size,
                    include_path=self.include_path or None,
                )
                row["lm_eval"] = out.as_dict()
                metrics.update(out.metrics())
            trainer.strategy.barrier("lm_eval")
        self.results[moment] = row
        if trainer.logger is not None and metrics:
            trainer.logger.log_metrics({f"eval/{moment}/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
        return row

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "fit_start" in self.when and "fit_start" not in self.results:  # not again when resumed
            self.evaluate(trainer, pl_module, "fit_start")

    def _check_pruned(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "after_pruning" not in self.when or "after_pruning" in self.results:
            return
        pruner = self._pruner(trainer)
        if pruner is not None and pruner.done >= len(pruner.schedule.plan()):
            self.evaluate(trainer, pl_module, "after_pruning")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._check_pruned(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._check_pruned(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_pruned(trainer, pl_module)
        if "fit_end" in self.when:
            self.evaluate(trainer, pl_module, "fit_end")
        if trainer.is_global_zero and self.results:
            print("\n" + self.table(), flush=True)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(self.as_dict(), indent=2, default=str))
                tmp.replace(self.path)

    # ------------------------------------------------------------------ output
    def as_dict(self) -> dict[str, Any]:
        return {
            "perplexity_protocol": self.protocol.as_dict() if self.protocol is not None else None,
            "tasks": self.tasks,
            "limit": self.limit,
            "results": self.results,
        }

    def table(self) -> str:
        """``| metric | <moment> ... |``: perplexity (with its protocol) and each task's reported metric."""
        moments = [w for w in WHEN if w in self.results]
        names = {"fit_start": "dense (fit start)", "after_pruning": "pruned", "fit_end": "fit end"}
        lines = [
            "| metric | " + " | ".join(f"{names[m]} @ step {self.results[m]['step']}" for m in moments) + " |",
            "|---|" + "---:|" * len(moments),
        ]
        if self.protocol is not None:
            p = self.protocol.as_dict()
            what = f"{p['source']}" + (f"/{p['split']}" if p["split"] else "")
            label = (
                f"ppl ({what}, {p['seq_len']}-token windows, stride {p['stride']}"
                + (f", first {p['max_windows']}" if p["max_windows"] else "")
                + f", bos {p['add_bos']})"
            )
            vals = [self.results[m].get("perplexity", {}).get("ppl") for m in moments]
            lines.append(f"| {label} | " + " | ".join(_fmt(v, 3) for v in vals) + " |")
        rows: dict[tuple[str, str], dict[str, float]] = {}
        for m in moments:
            for r in self.results[m].get("lm_eval", {}).get("rows", []):
                rows.setdefault((r["task"], r["metric"]), {})[m] = r["value"]
        for (task, metric), vals in rows.items():
            n = self.limit
            label = f"{task} ({metric}" + (f", first {n} docs" if n else "") + ")"
            lines.append(f"| {label} | " + " | ".join(_fmt(vals.get(m), 4) for m in moments) + " |")
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpoint
    def record(self) -> dict[str, Any]:
        """The protocol, the tasks and every result (for the export's manifest)."""
        return self.as_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))


def _fmt(v: float | None, digits: int) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


__all__ = ["EvaluationCallback"]
