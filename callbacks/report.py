"""Held-out perplexity of the dense, pruned and recovered model in one run, with a baseline criterion beside it."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import lightning.pytorch as pl

from pruning import prune
from pruning.evaluation.nll import all_reduce_sums, summed_nll
from pruning.options import PruneOptions

from .export import find_hf_model
from .pruning import PruningCallback


def heldout_nll(model, loader, device) -> tuple[float, int]:
    """Sum of next-token NLL and scored tokens over ``loader`` (labels -100 skipped), summed over ranks."""
    nll, tokens = summed_nll(model, loader, device)
    return all_reduce_sums(nll, tokens, device)


class PruningReport(pl.Callback):
    """Evaluates held-out perplexity (the DataModule's ``val_dataloader``) of the dense model at fit start, of the
    pruned model right after the :class:`PruningCallback`'s last event, and of the recovered model at fit end;
    with ``baseline`` set, the dense model pruned by that criterion at the same granularity and final sparsity
    (no recovery) is evaluated beside it. Prints a markdown table on rank 0, logs ``report/*`` and writes
    ``path`` (JSON) if given. The baseline keeps a host copy of the dense model: leave it unset for big models.

    Args:
        baseline: criterion of the baseline (e.g. ``magnitude``), or null.
        path: where to write the table as JSON (rank 0).
    """

    def __init__(self, baseline: str | None = "magnitude", path: str | None = None) -> None:
        self.baseline = baseline
        self.path = Path(path) if path else None
        self.rows: list[dict] = []
        self._dense = None
        self._pruned_done = False

    def _pruner(self, trainer) -> PruningCallback | None:
        return next((c for c in trainer.callbacks if isinstance(c, PruningCallback)), None)

    def _row(self, trainer, pl_module, name: str, model) -> None:
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else None
        if loader is None:
            raise ValueError("PruningReport needs a DataModule with a val_dataloader (held-out text)")
        nll, tokens = heldout_nll(model, loader, pl_module.device)
        pruner = self._pruner(trainer)
        masks = pruner.masks if pruner is not None and model is find_hf_model(pl_module) else None
        total = sum(p.numel() for p in model.parameters())
        zeroed = masks.report(model).model.pruned if masks is not None and len(masks) else 0
        row = {
            "model": name,
            "heldout_ppl": math.exp(nll / max(tokens, 1)),
            "tokens": tokens,
            "params": total - zeroed,
            "step": trainer.global_step,
        }
        self.rows.append(row)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"report/{name}_ppl": row["heldout_ppl"]}, step=trainer.global_step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rows:  # resumed: the dense row is already there
            return
        model = find_hf_model(pl_module)
        self._row(trainer, pl_module, "dense", model)
        if self.baseline:
            self._dense = copy.deepcopy(model).cpu()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pruner = self._pruner(trainer)
        if self._pruned_done or pruner is None or pruner.done < len(pruner.schedule.plan()):
            return
        self._pruned_done = True
        what = f"{pruner.options.unit} {pruner.schedule.final_sparsity():.0%}"
        label = f"pruned ({pruner.options.method}, {what})"
        self._row(trainer, pl_module, label, find_hf_model(pl_module))
        if self.baseline and self._dense is not None:
            base = self._dense.to(pl_module.device)
            sparsity = pruner.schedule.final_sparsity()
            selection = dataclasses.replace(pruner.options, method=self.baseline, criterion_options={})
            options = PruneOptions.of(selection, sparsity=sparsity)
            calib = None
            if pruner.options.criterion().needs_activations or self.baseline != "magnitude":
                dm = trainer.datamodule
                calib = (
                    dm.calibration_batches(32)
                    if hasattr(dm, "calibration_batches")
                    else [b["input_ids"] for _, b in zip(range(32), dm.train_dataloader())]
                )
            res = prune(base, calib, options=options, progress=False)
            self._baseline_masks = res.masks
            name = f"baseline ({self.baseline}, {what})"
            loader = trainer.datamodule.val_dataloader()
            nll, tokens = heldout_nll(base, loader, pl_module.device)
            self.rows.append(
                {
                    "model": name,
                    "heldout_ppl": math.exp(nll / max(tokens, 1)),
                    "tokens": tokens,
                    "params": sum(p.numel() for p in base.parameters()) - res.report.model.pruned,
                    "step": trainer.global_step,
                }
            )
            self._dense = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._row(trainer, pl_module, "recovered" if self._pruned_done else "trained", find_hf_model(pl_module))
        if trainer.is_global_zero:
            print("\n" + self.table(), flush=True)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.rows, indent=2))
                tmp.replace(self.path)

    def table(self) -> str:
        lines = ["| model | held-out ppl | params | step |", "|---|---:|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r['model']} | {r['heldout_ppl']:.3f} | {r['params']:,} | {r['step']} |")
        return "\n".join(lines)

    def record(self) -> dict:
        """The baseline criterion and the table's rows (for the export's manifest)."""
        return {"baseline": self.baseline, "rows": self.rows}

    def state_dict(self) -> dict:
        return {"rows": self.rows, "pruned_done": self._pruned_done}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])
        self._pruned_done = bool(state_dict["pruned_done"])
