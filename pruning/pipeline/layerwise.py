"""Run calibration data through a model one decoder layer at a time (the Wanda / SparseGPT / GBLM protocol).

The inputs of the first decoder layer are captured by a forward pre-hook *with all its keyword arguments*
(rotary ``position_embeddings``, attention mask, cache and position arguments, whatever the model's own forward
passes), so nothing is rebuilt by hand and new transformers versions keep working. Each layer is then called
through its own ``forward`` with those arguments; after the caller has pruned it, its outputs (computed with the
pruned weights) become the next layer's inputs.

Layers may live on CPU and visit ``device`` one at a time: peak device memory is one layer plus the calibration
hidden states (``store='cpu'`` keeps those on the host too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from ..structure import ModelStructure


class _StopForward(Exception):
    pass


def to_device(obj, device):
    """``obj`` (a tensor, or tuples / lists / dicts of them, anything else as it is) on ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def move_except(module: nn.Module, skip: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer except those under ``skip`` (the decoder layers) to ``device``."""
    for child in module.children():
        if child is not skip:
            move_except(child, skip, device)
    for _key, p in module._parameters.items():
        if p is not None and p.device != device:
            p.data = p.data.to(device)
    for key, b in module._buffers.items():
        if b is not None and b.device != device:
            module._buffers[key] = b.to(device)


def _raise_stop(module, args):
    raise _StopForward


def layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    structure: ModelStructure,
    calibration: Iterable[torch.Tensor],
    device: torch.device,
    store: torch.device,
) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments reaching the first decoder layer, one entry per calibration batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach().to(store), to_device(kwargs, store)))
        raise _StopForward

    handle = structure.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calibration:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _merge_value(values: list, sizes: list[int]):
    """One keyword argument of several calibration batches, as the argument of their concatenation."""
    first = values[0]
    if torch.is_tensor(first):
        same = all(torch.is_tensor(v) and v.shape == first.shape and torch.equal(v, first) for v in values)
        if same and (first.dim() == 0 or first.shape[0] == 1):
            return first  # broadcast over the batch (rotary tables, cache positions)
        if all(torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n for v, n in zip(values, sizes)):
            return torch.cat(values)
        raise ValueError(
            f"cannot merge calibration batches: a layer argument of shape {tuple(first.shape)} is "
            "neither shared nor per-sequence. HINT: use within_layer='dense'"
        )
    if isinstance(first, (tuple, list)):
        return type(first)(_merge_value([v[k] for v in values], sizes) for k in range(len(first)))
    if isinstance(first, dict):
        return {k: _merge_value([v[k] for v in values], sizes) for k in first}
    if any(v != first for v in values):
        raise ValueError(
            "cannot merge calibration batches: their layer arguments differ. HINT: use within_layer='dense'"
        )
    return first


def merge_inputs(inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """All calibration batches as one batch (hidden states concatenated, per-sequence arguments concatenated, shared
    ones kept), so that every Linear of a layer sees the whole calibration set in a single call."""
    if len(inputs) <= 1:
        return inputs
    sizes = [h.shape[0] for h, _ in inputs]
    hidden = torch.cat([h for h, _ in inputs])
    kwargs = {k: _merge_value([kw[k] for _, kw in inputs], sizes) for k in inputs[0][1]}
    return [(hidden, kwargs)]


def run_layerwise(
    model: nn.Module,
    structure: ModelStructure,
    calibration: Iterable[torch.Tensor],
    on_layer: Callable[[int, Callable[[], None]], None],
    *,
    device: torch.device | str | None = None,
    store: str = "device",
    progress: bool = True,
    one_pass: bool = False,
    visit: Callable[[int], AbstractContextManager] | None = None,
) -> None:
    """Call ``on_layer(index, forward_all)`` for each decoder layer in order.

    ``one_pass``: the calibration batches are merged into one batch (:func:`merge_inputs`), ``on_layer`` prunes
    while the layer runs (e.g. from forward pre-hooks) and returns ``forward_all(keep_outputs=True)``; those outputs,
    already computed with the pruned weights, feed the next layer, so every layer runs once.

    ``forward_all(stop_at=None)`` runs every calibration batch through that layer (with the inputs produced by the
    already processed layers); ``on_layer`` typically attaches statistics hooks, calls it, and prunes the layer.
    Then the layer's outputs are recomputed with its pruned weights and fed to the next layer. ``device``: where
    layers are computed (default: where the model is); layers found elsewhere are moved there one at a time and
    back. ``visit(i)``: a context entered around everything done with layer ``i`` (a checkpoint streamed from
    disk materialises the layer on entry, writes and releases it on exit).
    """
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    store_dev = dev if store == "device" else torch.device("cpu")
    was_training = model.training
    model.eval()
    if dev != home:
        move_except(model, structure.layers, dev)
    try:
        inputs = capture_inputs(model, structure, calibration, dev, store_dev)
        if one_pass:
            inputs = merge_inputs(inputs)
        bar = tqdm(range(structure.num_layers), desc="layers", unit="layer", disable=not progress)
        for i in bar:
            with (visit or _here)(i):
                inputs = _one_layer(structure.layers[i], i, inputs, on_layer, dev, store_dev, one_pass, structure)
                if inputs is None:  # nothing reads the last layer's outputs
                    break
    finally:
        if dev != home:
            move_except(model, structure.layers, home)
        model.train(was_training)


def _here(i: int) -> AbstractContextManager:
    return nullcontext()


def _one_layer(layer: nn.Module, i: int, inputs: list, on_layer: Callable, dev, store_dev, one_pass: bool, structure):
    """Layer ``i``'s turn in :func:`run_layerwise`: ``on_layer`` (statistics, pruning), then its outputs with the
    pruned weights, the next layer's inputs (``None`` after the last layer)."""
    layer_home = next(layer.parameters()).device
    layer.to(dev)

    def forward_all(stop_at: nn.Module | None = None, keep_outputs: bool = False):
        # stop_at: a module whose inputs are the last thing wanted (e.g. the MLP's output projection, once
        # its input statistics are taken): its pre-hook ends the pass, saving that matmul.
        handle = None
        if stop_at is not None:
            handle = stop_at.register_forward_pre_hook(_raise_stop)
        outputs = []
        try:
            with torch.no_grad():
                for hidden, kwargs in inputs:
                    try:
                        out = layer(hidden.to(dev), **to_device(kwargs, dev))
                        if keep_outputs:
                            outputs.append(layer_output(out).to(store_dev))
                    except _StopForward:
                        pass
        finally:
            if handle is not None:
                handle.remove()
        return outputs if keep_outputs else None

    try:
        result = on_layer(i, forward_all)
        if one_pass:
            if result is None or len(result) != len(inputs):
                raise RuntimeError("run_layerwise(one_pass=True): on_layer must return forward_all(keep_outputs=True)")
            return [(out, kw) for out, (_, kw) in zip(result, inputs)]
        if i == structure.num_layers - 1:
            return None
        with torch.no_grad():
            return [(layer_output(layer(h.to(dev), **to_device(kw, dev))).to(store_dev), kw) for h, kw in inputs]
    finally:
        layer.to(layer_home)
