"""Pruning a checkpoint larger than host memory: ``pruning.prune("path/to/checkpoint", calibration, ...,
save_to="pruned/")``.

The model is built with its parameters on the ``meta`` device (:func:`~pruning.surgery.meta.build_on_meta`); what
lies outside the decoder layers (embeddings, final norm, head) is read from the safetensors files at once, each
decoder layer only while it is used (memory-mapped, one tensor at a time) and put back on ``meta`` after. With
``save_to`` each layer, once pruned, is made smaller (structured granularities, :func:`~pruning.surgery.compact_layer`)
and written as its own safetensors shard; the config, the index and the manifest follow at the end, the directory
swapped in atomically. The whole model is never in memory: one layer, the head, the calibration activations.
A mixture-of-experts checkpoint holds one tensor per expert where the model stacks them (as transformers saves it):
each layer's stacked weights are made from those as it is read (:class:`~pruning.surgery.meta.TensorFiles`) and
split again as it is written (:func:`~pruning.surgery.meta.original_names`); a per-layer export keeps the stacked
names, as :func:`~pruning.save_pretrained` writes one.

- Activation criteria (wanda, sparsegpt, gblm, ...): the sequential protocol of the in-memory path
  (:func:`~pruning.pipeline.drive.prune_layer_by_layer`); OWL's first pass streams the layers too.
- Gradient criteria (taylor, sdm, saap, gblm's gradients): the statistics of the whole-model backward from
  :func:`~pruning.pipeline.streamed.collect_gradients_layerwise`, each layer's spilled to a temporary file as its
  backward completes; then a second pass selects every layer from them (OWL's ratios known by then).
- ``allocation='global'`` over one kind of groups: a first pass gathers every layer's group scores (small), the
  ranking follows, a second pass applies and writes each layer.
- Not supported here (each refused with the reason): the other selections that rank across layers (global
  unstructured thresholds, ``scope='global'``: every weight's score at once, the size of the model in fp32; whole
  ``layer`` granularity and joint budgets of two kinds of groups: not implemented in this driver);
  targets outside the decoder layers (embeddings, LM head), and experts held as 3-D parameters under a gradient
  criterion that needs per-sequence statistics (sdm, saap, gblm: a batched backward cannot make them for a 3-D
  weight; Taylor, which needs only their sum, reads each layer's ``.grad`` after its walk back);
  ``sequential=False`` (statistics of the dense model through every layer at once); continuing earlier masks.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..masks import MaskSet, SparsityReport
from ..masks.report import Counts
from ..options import PruneOptions
from ..stats import GradientCollector
from ..structure import ModelStructure
from ..surgery import atomic_export, compact_layer, read_config, rewrite_config, write_model_files
from ..surgery.meta import TensorFiles, build_on_meta, materialise, original_names, release, trim_host_memory
from .calibration import calibration_batches, calibration_fingerprint, check_calibration
from .drive import layer_statistics, prune_layer_by_layer
from .layerwise import run_layerwise
from .pruner import Pruner, PruneResult
from .streamed import collect_gradients_layerwise


def refusal(options: PruneOptions) -> str | None:
    """Why ``options`` cannot prune a checkpoint streamed from disk (``None``: they can)."""
    crit = options.criterion()
    unit = options.unit
    groups_globally = unit.structured and not unit.joint and unit.name != "layer" and options.allocation == "global"
    if options.ranks_across_layers and not groups_globally:
        return (
            f"allocation={options.allocation!r}, granularity={str(options.unit)!r}, scope="
            f"{options.comparison_scope!r} rank scores across layers: every weight's score (unstructured), whole layers"
            " or two kinds of groups under one budget, which this driver does not hold. HINT: allocation='uniform', "
            "'owl' or 'rates', or 'global' with one kind of structured groups"
        )
    if options.include_embeddings or options.include_lm_head:
        return "targets outside the decoder layers (embeddings, LM head). HINT: leave include_* off"
    if crit.needs_activations and not options.sequential:
        return "sequential=False scores the dense model's activations at once. HINT: sequential=True (the default)"
    return None


class _Checkpoint:
    """The checkpoint's decoder layers, materialised one at a time; each pruned layer written as it is released."""

    def __init__(self, pruner: Pruner, tensors: TensorFiles, out: Path | None) -> None:
        self.pruner, self.tensors, self.out = pruner, tensors, out
        self.structure = pruner.structure
        self.model = pruner.model
        self.written: dict[str, str] = {}  # tensor name -> shard file
        self.total_size = 0
        self.changed_heads = False
        self.reports: list[tuple[int, SparsityReport]] = []
        # the report's totals, at the shapes before any layer is made smaller
        self.totals = (
            sum(p.numel() for p in self.model.parameters()),
            sum(self.model.get_parameter(n).numel() for n in pruner.targets.weights),
        )
        self.spilled: dict[int, str] = {}
        self.gradients: GradientCollector | None = None
        self.spill_dir: str | None = None

    def prefix(self, i: int) -> str:
        return f"{self.structure.family.layers}.{i}."

    @contextmanager
    def visit(self, i: int) -> Iterator[None]:
        layer = self.structure.layers[i]
        materialise(layer, self.tensors, self.prefix(i))
        self.pruner.refresh_weights(i)
        self._restore(i)
        try:
            yield
            if set(self.pruner.targets.weights_in(i)) <= self.pruner.masks.names():
                self.finish(i)
        finally:
            release(layer)
            self.pruner.refresh_weights(i)
            self._drop_statistics(i)
            trim_host_memory()  # the layer's memory back to the system, not kept as heap: the peak stays flat

    def finish(self, i: int) -> None:
        """Layer ``i`` pruned: its share of the report, made smaller, written; its element masks dropped."""
        pruner, masks = self.pruner, self.pruner.masks
        mine = MaskSet()
        for name in pruner.names_in(i):
            if name in masks.element:
                mine.set_element(name, masks.element[name])
        for key, keep in masks.groups.items():
            if masks.group_sets[key].layer == i:
                mine.set_groups(masks.group_sets[key], keep)
        self.reports.append((i, mine.report(self.model, targets=pruner.targets.weights)))
        for name in pruner.names_in(i):
            masks.element.pop(name, None)
        self.changed_heads |= compact_layer(self.model, masks, i)
        self.write(self.prefix(i), self.structure.layers[i], f"layer-{i:05d}")
        self.spilled.pop(i, None)  # this layer's statistics are spent

    def write(self, prefix: str, module: nn.Module, shard: str, names: Iterable[str] | None = None) -> None:
        if self.out is None:
            return
        state = {prefix + n: p.detach().contiguous() for n, p in module.named_parameters()}
        state.update({prefix + n: b.detach().contiguous() for n, b in _persistent_buffers(module)})
        if names is not None:
            state = {k: v for k, v in state.items() if k in names}
        if not state:
            return
        state = original_names(self.model, state)  # e.g. a MoE layer one tensor per expert, as save_pretrained
        file = f"model-{shard}.safetensors"
        save_file(state, str(self.out / file), metadata={"format": "pt"})
        self.written.update(dict.fromkeys(state, file))
        self.total_size += sum(t.numel() * t.element_size() for t in state.values())

    # ---------------------------------------------------------------- gradient statistics spilled between passes
    def spill(self, i: int) -> None:
        """Layer ``i``'s gradient statistics to a temporary file, out of memory until its selection."""
        g = self.gradients
        state = {}
        for name in self.pruner.targets.weights_in(i):
            if name in g.stats:
                state.update({f"{name}|{k}": v for k, v in g.stats[name].sums.items()})
                g.stats[name].sums = {}
        file = os.path.join(self.spill_dir, f"{i}.safetensors")
        save_file(state, file)
        self.spilled[i] = file

    def _restore(self, i: int) -> None:
        if i not in self.spilled:
            return
        for key, t in load_file(self.spilled[i]).items():
            name, _, kind = key.rpartition("|")
            self.gradients.stats[name].sums[kind] = t

    def _drop_statistics(self, i: int) -> None:
        """Layer ``i``'s gradient statistics out of memory once it is left (on disk until it is written)."""
        if self.gradients is None:
            return
        for name in self.pruner.targets.weights_in(i):
            if name in self.gradients.stats:
                self.gradients.stats[name].sums = {}

    def report(self) -> SparsityReport:
        """The reports of the layers, one, with the group counts of the masks."""
        out = SparsityReport()
        layer_of = self.structure.layer_of
        out.model.total, out.targeted.total = self.totals
        for i, rep in self.reports:
            out.model.pruned += rep.model.pruned
            out.targeted.pruned += rep.targeted.pruned
            out.tensors.update({n: c for n, c in rep.tensors.items() if layer_of(n) == i})
            out.layers[i] = rep.layers[i]
            if "element" in rep.granularity:
                out.granularity.setdefault("element", Counts()).add(
                    rep.granularity["element"].pruned, rep.granularity["element"].total
                )
        for key, keep in self.pruner.masks.groups.items():
            kind = self.pruner.masks.group_sets[key].kind
            out.granularity.setdefault(kind, Counts()).add(int((~keep).sum()), keep.numel())
        return out


def _persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers of ``module`` a ``state_dict`` holds (non-persistent ones, rotary tables, are left out)."""
    keys = set(module.state_dict(keep_vars=True))
    return [(n, b) for n, b in module.named_buffers() if n in keys]


def prune_checkpoint(
    path: str | os.PathLike,
    calibration: Iterable[torch.Tensor] | None,
    options: PruneOptions,
    *,
    save_to: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    store: str = "cpu",
    progress: bool = True,
) -> PruneResult:
    """Prune the Hugging Face checkpoint at ``path`` one decoder layer at a time (see the module docstring);
    with ``save_to`` the pruned (compacted) model is written there shard by shard. Returns the group masks and the
    report (element masks are dropped once their layer is written: they would be the size of the model)."""
    why = refusal(options)
    if why:
        raise ValueError(f"pruning a checkpoint from its path: {why}")
    config = read_config(path)
    model = build_on_meta(config).eval()
    structure = ModelStructure(model)
    tensors = TensorFiles(path, model)  # by the model's names: a MoE checkpoint holds one tensor per expert
    outside = [n for n, _ in model.named_parameters() if structure.layer_of(n) is None]
    missing = materialise(model, tensors, names=outside)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied head is the embeddings just read
    if any(p.is_meta for n, p in model.named_parameters() if structure.layer_of(n) is None):
        raise ValueError(f"{str(path)!r} lacks weights: {missing[:5]}")
    pruner = Pruner(model, options)
    calib = calibration_batches(calibration)
    check_calibration(calib, model)
    crit = pruner.criterion
    if (crit.needs_activations or crit.needs_gradients) and not calib:
        raise ValueError(f"method={options.method!r} needs calibration data: pass calibration=[token-id tensors]")
    pruner.info["calibration"] = calibration_fingerprint(calib) if calib else None
    pruner.info["streamed_from"] = str(path)
    with atomic_export(save_to) if save_to is not None else nullcontext(None) as out:
        ckpt = _Checkpoint(pruner, tensors, out)
        _drive(ckpt, calib, device, store, progress)
        if out is not None:
            _write_rest(ckpt, out)
    tensors.close()
    return pruner.result(report=ckpt.report())


def _drive(ckpt: _Checkpoint, calib: list[torch.Tensor], device, store: str, progress: bool) -> None:
    pruner = ckpt.pruner
    crit, options = pruner.criterion, pruner.options
    with tempfile.TemporaryDirectory(prefix="pruning-spill-") as spill:
        ckpt.spill_dir = spill
        if crit.needs_gradients:
            ckpt.gradients = gradients = pruner.gradient_collector()
            per_sequence = {} if gradients.sums_only else gradients.unbatchable()  # sums: each layer's .grad
            if per_sequence:
                name, why = next(iter(per_sequence.items()))
                raise ValueError(
                    f"pruning a checkpoint from its path: method={options.method!r} needs per-sequence gradient "
                    f"statistics of {name} ({why}; {len(per_sequence)} such), which the layer-by-layer backward does "
                    "not make (one backward per sequence through the streamed layers). HINT: method='taylor', "
                    "'magnitude', 'wanda', 'reap' or 'frequency' for experts, or prune the model in memory"
                )
            ratios: list[float] = []

            def done(i: int) -> None:
                if options.allocation == "owl" and not crit.needs_activations:
                    ratios.append(pruner.outlier_ratio(i, pruner.context(None, gradients)))
                ckpt.spill(i)

            collect_gradients_layerwise(
                pruner.model,
                calib,
                gradients,
                alpha=options.alpha,
                temperature=options.temperature,
                kl_positions=options.kl_positions,
                device=device,
                store=store,
                visit=ckpt.visit,
                done=done,
                progress=progress,
            )
            if ratios:
                pruner.set_outlier_rates(ratios[::-1])  # the walk back went from the last layer
        else:
            gradients = None
        if options.ranks_across_layers:
            _select_globally(ckpt, calib, gradients, device, store, progress)
            return
        if crit.needs_activations:
            one_pass = options.within_layer == "sequential"
            prune_layer_by_layer(
                pruner, calib, gradients, one_pass=one_pass, device=device, store=store, progress=progress,
                visit=ckpt.visit,
            )  # fmt: skip
            return
        for i in range(pruner.structure.num_layers):  # selection from the statistics (or the weights alone)
            with ckpt.visit(i):
                pruner.select_layer(i, pruner.context(None, gradients))
                pruner.apply(pruner.names_in(i))


def _select_globally(ckpt: _Checkpoint, calib, gradients, device, store: str, progress: bool) -> None:
    """A global ranking of groups in two passes: every layer's group scores (on the dense model, as the in-memory
    path scores it), the ranking, then each layer visited again to apply its masks and be written."""
    pruner = ckpt.pruner
    model, structure = pruner.model, pruner.structure
    scores: list[torch.Tensor] = []
    if pruner.criterion.needs_activations:

        def on_layer(i: int, forward_all) -> None:
            stats = layer_statistics(pruner, i, forward_all)
            scores.extend(pruner.group_scores_in(i, pruner.context(stats, gradients)))

        run_layerwise(
            model, structure, calib, on_layer, device=device, store=store, progress=progress, visit=ckpt.visit
        )
    else:
        for i in range(structure.num_layers):
            with ckpt.visit(i):
                scores.extend(pruner.group_scores_in(i, pruner.context(None, gradients)))
    pruner.select_across_layers(pruner.context(), scores)
    for i in range(structure.num_layers):
        with ckpt.visit(i):
            pruner.apply(pruner.names_in(i))


def _own_names(ckpt: _Checkpoint, out: Path) -> None:
    """A per-layer export holds the model's own names (as :func:`~pruning.save_pretrained` writes it, and
    :func:`~pruning.load_pretrained` reads it): each shard written in the stock layout (one tensor per expert) is
    read back and written again stacked, one layer at a time."""
    own = set(ckpt.model.state_dict(keep_vars=True))
    for file in sorted(set(ckpt.written.values())):
        names = [k for k, f in ckpt.written.items() if f == file]
        if all(k in own for k in names):
            continue
        tensors = TensorFiles(out / file, ckpt.model)
        state = {n: tensors.get(n).clone(memory_format=torch.contiguous_format) for n in tensors.keys()}
        tensors.close()
        tmp = out / f"{file}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / file)
        for n in names:
            del ckpt.written[n]
        ckpt.written.update(dict.fromkeys(state, file))


def _write_rest(ckpt: _Checkpoint, out: Path) -> None:
    """What lies outside the decoder layers, the config of the smaller layers, the index and the manifest."""
    import json

    model, structure = ckpt.model, ckpt.structure
    own = {n for n in model.state_dict() if structure.layer_of(n) is None}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    ckpt.write("", model, "rest", names=own - tied)
    rewrite_config(model, ckpt.changed_heads)
    if getattr(model.config, "is_heterogeneous", False):
        _own_names(ckpt, out)
    files = sorted(set(ckpt.written.values()))
    renamed = {f: f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k, f in enumerate(files)}
    for old, new in renamed.items():
        os.rename(out / old, out / new)
    index = {
        "metadata": {"total_size": ckpt.total_size},
        "weight_map": {k: renamed[f] for k, f in sorted(ckpt.written.items())},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_model_files(model, out, {"method": ckpt.pruner.options.method, **ckpt.pruner.options.record()})
