"""Gradient statistics one decoder layer at a time: the whole-model backward of
:func:`~pruning.pipeline.calibration.collect_gradients`, exactly, with one layer on the device at a time.

1. *Forward sweep*: the calibration data runs through the layers one at a time without autograd, each layer's
   input kept (on the host with ``store='cpu'``); the last layer's output is the final hidden state.
2. *Top*: the model's head (final norm, LM head) runs on that hidden state with autograd, the loss (CE, or
   SDMPrune's KL + CE against the teacher: the same streamed weights with the masks lifted) is backpropagated to the
   final hidden state.
3. *Walk back*: layer by layer from the last, the layer's forward is recomputed from its stored input with autograd
   on and the incoming gradient backpropagated through it; the per-sequence statistics are folded in that backward
   (:class:`~pruning.stats.SequenceGradients`), and the input's gradient is passed down.
4. *Bottom* (only when an embedding's gradient is wanted): the embeddings' forward and backward.

Device peak: one decoder layer, its activations, the embeddings and the head. Parameters a batched backward cannot
serve (an embedding, a tied head) are read from ``.grad``: a sweep per sequence (per calibration tensor when only the
sums are wanted), ``.grad`` adding the parts of the walk up as a whole-model backward would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..losses import KLPositions
from ..masks import MaskSet
from ..stats import GradientCollector
from ..structure import ModelStructure
from .calibration import (
    calibration_batches,
    check_distillation_gradient,
    gradient_mode,
    iter_sequences,
    sequence_losses,
)
from .layerwise import capture_inputs, layer_output, move_except, to_device

Inputs = list[tuple[torch.Tensor, dict]]  # per calibration tensor: the hidden states reaching a layer, its kwargs
LayerHook = Callable[[int], None]


class _Given(nn.Module):
    """Stands in for the decoder layers in a forward that should only run the head: returns the hidden state it
    was given, whatever it receives (the model's own forward then applies its final norm and LM head)."""

    def __init__(self, like: nn.Module, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple
        if hasattr(like, "attention_type"):  # read by some families' mask mapping
            self.attention_type = like.attention_type

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@contextmanager
def _only_head(structure: ModelStructure, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """The model's decoder layers replaced by one that returns ``hidden``: its forward computes the head only."""
    layers = structure.layers
    saved = list(layers)
    del layers[:]
    layers.append(_Given(saved[-1], hidden, as_tuple))
    try:
        yield
    finally:
        del layers[:]
        layers.extend(saved)


def _head_logits(model: nn.Module, structure: ModelStructure, ids: torch.Tensor, hidden: torch.Tensor, as_tuple):
    with _only_head(structure, hidden, as_tuple):
        return model(input_ids=ids, use_cache=False).logits


class LayerStream:
    """A model whose decoder layers visit ``device`` one at a time (the rest, embeddings and head, moved there for
    the stream's life); the calibration inputs of every layer kept on ``store``."""

    def __init__(self, model: nn.Module, structure: ModelStructure, device, store: str = "cpu", visit=None) -> None:
        self.model, self.structure, self.visit = model, structure, visit
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.home
        self.store = self.device if store == "device" else torch.device("cpu")
        self.as_tuple = False

    @contextmanager
    def opened(self) -> Iterator[LayerStream]:
        if self.device != self.home:
            move_except(self.model, self.structure.layers, self.device)
        try:
            yield self
        finally:
            if self.device != self.home:
                move_except(self.model, self.structure.layers, self.home)

    @contextmanager
    def visiting(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer ``i`` on the device for the block, back home after it (inside ``visit(i)``, if given)."""
        layer = self.structure.layers[i]
        with self.visit(i) if self.visit is not None else nullcontext():
            layer_home = next(layer.parameters()).device
            layer.to(self.device)
            try:
                yield layer
            finally:
                layer.to(layer_home)

    @torch.no_grad()
    def sweep(self, batches: Sequence[torch.Tensor]) -> tuple[list[Inputs], list[torch.Tensor]]:
        """Every layer's inputs and the final hidden states of ``batches``, one layer on the device at a time."""
        inputs = capture_inputs(self.model, self.structure, batches, self.device, self.store)
        per_layer: list[Inputs] = []
        for i in range(self.structure.num_layers):
            per_layer.append(inputs)
            with self.visiting(i) as layer:
                outs = []
                for h, kw in inputs:
                    out = layer(h.to(self.device), **to_device(kw, self.device))
                    self.as_tuple = isinstance(out, (tuple, list))
                    outs.append(layer_output(out).to(self.store))
            inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs)]
        return per_layer, [h for h, _ in inputs]

    def logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits of the final hidden states ``hidden`` (autograd as the caller has it)."""
        return _head_logits(self.model, self.structure, ids.to(self.device), hidden, self.as_tuple)


def _teacher_hidden(stream: LayerStream, batches, alpha: float, masks: MaskSet | None) -> list | None:
    """The teacher's final hidden states: the same streamed weights with the masks lifted (``None``: no distillation,
    or nothing pruned yet, when the student is its own teacher)."""
    if alpha <= 0 or masks is None or not masks.has_original:
        return None
    with masks.lifted(stream.model):
        return stream.sweep(batches)[1]


def _top(stream, ids, hidden, teacher_hidden, loss_args, masks, teacher, begin, end) -> torch.Tensor:
    """The loss's gradient with respect to the final hidden states (the head's own statistics folded on the way)."""
    alpha = loss_args[0]
    ids = ids.to(stream.device)
    target = None
    if alpha > 0 and teacher is not None:
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
    elif teacher_hidden is not None:
        with torch.no_grad(), masks.lifted(stream.model):
            target = stream.logits(ids, teacher_hidden.to(stream.device))
    h = hidden.to(stream.device).requires_grad_(True)
    begin(ids.shape[0])
    with torch.enable_grad():
        logits = stream.logits(ids, h)
        if alpha > 0 and target is None:
            target = logits.detach()
        loss = sequence_losses(logits, ids, target, *loss_args)
        del logits, target
        loss.backward()
    end()
    return h.grad


def _walk_back(stream: LayerStream, per_layer: list[Inputs], grads: list, begin, end, after_layer, read=None) -> list:
    """From the last layer down: each layer's forward recomputed from its stored input, the incoming gradient
    backpropagated through it; returns the gradients of the first layer's inputs. ``read(i, sequences)``: called
    after each calibration tensor's backward through layer ``i`` (its ``.grad`` read, then cleared)."""
    for i in reversed(range(stream.structure.num_layers)):
        inputs = per_layer[i]
        with stream.visiting(i) as layer:
            for b, (h, kw) in enumerate(inputs):
                x = h.to(stream.device).requires_grad_(True)
                begin(x.shape[0])
                with torch.enable_grad():
                    out = layer_output(layer(x, **to_device(kw, stream.device)))
                    out.backward(grads[b].to(stream.device))
                end()
                if read is not None:
                    read(i, x.shape[0])
                grads[b] = x.grad.to(stream.store)
                del out, x  # the graph holds the layer's parameters: freed with the layer, not one layer later
            after_layer(i)
        per_layer[i] = []  # this layer's inputs are no longer needed
    return grads


def _bottom(stream: LayerStream, batches: Sequence[torch.Tensor], grads: list) -> None:
    """The embeddings' backward: their forward up to the first layer with autograd on, the first layer's input
    gradient backpropagated into it."""
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = stream.structure.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, g in zip(batches, grads):
            captured.clear()
            try:
                stream.model(input_ids=ids.to(stream.device), use_cache=False)
            except _Stop:
                pass
            captured[0].backward(g.to(stream.device))
    finally:
        handle.remove()


class _Stop(Exception):
    pass


def _stream_pass(
    stream, batches, collector, loss_args, masks, teacher, batched: bool, embeddings: bool, done=None, read=None
) -> None:
    """One forward sweep, top and walk back over ``batches`` (``batched``: the collector's per-sequence function
    folds each layer's statistics in its backward, around each (layer, calibration tensor) call; otherwise ``.grad``
    is read by ``read(i, sequences)`` after each calibration tensor's backward through layer ``i``, the layer still
    visited, or by the caller after the pass)."""
    home = stream.home

    def begin(n: int) -> None:
        if batched:
            collector.begin_batch(n)

    def end() -> None:
        if batched:
            collector.end_batch()

    def after_layer(i: int) -> None:
        if not batched and read is None:
            return  # .grad is read after the pass
        for p in stream.structure.layers[i].parameters():
            p.grad = None
        _statistics_home(collector, home)
        if done is not None:
            done(i)

    per_layer, final = stream.sweep(batches)
    teacher_hidden = _teacher_hidden(stream, batches, loss_args[0], masks)
    grads = []
    for b, ids in enumerate(batches):
        th = None if teacher_hidden is None else teacher_hidden[b]
        grads.append(_top(stream, ids, final[b], th, loss_args, masks, teacher, begin, end).to(stream.store))
    del final, teacher_hidden
    grads = _walk_back(stream, per_layer, grads, begin, end, after_layer, read)
    if embeddings:
        _bottom(stream, batches, grads)


def _read_layer(stream: LayerStream, collector: GradientCollector, i: int, samples: int) -> None:
    """Layer ``i``'s ``.grad`` (``samples`` sequences' sum) into the collector's fp32 sums, then cleared: read after a
    calibration tensor's backward through it (complete for that tensor: nothing above adds to it later) while it is
    visited, so from its parameters as they are now (a layer materialised from disk holds new ones)."""
    prefix = f"{stream.structure.family.layers}.{i}"
    layer = stream.structure.layers[i]
    live = {f"{prefix}.{n}": p for n, p in layer.named_parameters(remove_duplicate=False)}
    lost = [n for n in collector.params if n.startswith(prefix + ".") and n not in live]
    if lost:
        raise RuntimeError(f"layer {i} has no parameters named {lost[:3]}: their gradient statistics would be lost")
    collector.update(samples=samples, live=live)
    for p in layer.parameters():
        p.grad = None


def _read_grads(model: nn.Module, collector: GradientCollector, samples: int) -> None:
    """Every ``.grad`` left (``samples`` sequences' sum) into the collector, then cleared."""
    collector.update(samples=samples)
    for p in model.parameters():
        p.grad = None


def streams(model: nn.Module, device: torch.device | str | None) -> bool:
    """Whether ``model`` lives elsewhere than ``device``, so that its layers visit the device one at a time."""
    return device is not None and torch.device(device) != next(model.parameters()).device


def _statistics_home(collector: GradientCollector, home: torch.device) -> None:
    """The statistics made on the device so far moved to where the model lives (the device holds one layer's)."""
    for s in [*collector.stats.values(), *collector.group_stats.values()]:
        for k, v in s.sums.items():
            if v.device != home:
                s.sums[k] = v.to(home)


def collect_gradients_layerwise(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    collector: GradientCollector,
    *,
    device: torch.device | str | None = None,
    store: str = "cpu",
    visit: Callable[[int], AbstractContextManager] | None = None,
    done: LayerHook | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    kl_positions: KLPositions = "labelled",
    masks: MaskSet | None = None,
    teacher: nn.Module | None = None,
    batched: bool = True,
    progress: bool = False,
) -> GradientCollector:
    """:func:`~pruning.pipeline.calibration.collect_gradients` with one decoder layer on ``device`` at a time (see
    the module docstring): the same statistics, the same arguments; ``store``: where every layer's calibration
    inputs wait (``'cpu'``: the host, ``'device'``); ``progress``: a bar over the passes. ``visit(i)``: a context
    entered around each use of layer ``i`` (a checkpoint streamed from disk materialises it); ``done(i)``: called in
    the walk back once layer ``i``'s statistics are complete, the layer still visited (batched passes only)."""
    check_distillation_gradient(alpha, temperature, masks, model, teacher)
    structure = ModelStructure(model)
    stream = LayerStream(model, structure, device, store, visit)
    per_batch = not batched or bool(collector.unbatchable())  # .grad read after each pass (sums: each layer's)
    sums = per_batch and collector.sums_only
    if per_batch and not sums and done is not None:
        raise ValueError(
            f"done= needs statistics complete after each layer's walk back; {sorted(collector.unbatchable())[:3]} "
            "need one backward per sequence. HINT: target the decoder layers' Linears only"
        )
    batches = calibration_batches(calibration) if not per_batch or sums else list(iter_sequences(calibration))
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    weight_grads = collector.weight_grads
    loss_args = (alpha, temperature, kl_positions)
    with gradient_mode(model, collector) as wanted, stream.opened():
        try:
            if not per_batch:
                collector.weight_grads = False
                collector.attach()
                _stream_pass(
                    stream, batches, collector, loss_args, masks, teacher, True, bool(wanted & embedding), done
                )
            else:
                for group in tqdm([batches] if sums else [[b] for b in batches], "gradients", disable=not progress):
                    n = sum(b.shape[0] for b in group)
                    read = (lambda i, k: _read_layer(stream, collector, i, k)) if sums else None
                    _stream_pass(
                        stream, group, collector, loss_args, masks, teacher, False, bool(wanted & embedding), done, read
                    )
                    _read_grads(model, collector, n)  # what the walk back left: the embeddings' (sums) or all
        finally:
            if not per_batch:
                collector.detach()
                collector.weight_grads = weight_grads
    return collector
