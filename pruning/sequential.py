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

import torch
from torch import nn
from tqdm.auto import tqdm

from .structure import ModelStructure


class _StopForward(Exception):
    pass


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_except(module: nn.Module, skip: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer except those under ``skip`` (the decoder layers) to ``device``."""
    for child in module.children():
        if child is not skip:
            _move_except(child, skip, device)
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
    model: nn.Module, structure: ModelStructure, calibration: Iterable[torch.Tensor], device: torch.device,
    store: torch.device,
) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments reaching the first decoder layer, one entry per calibration batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach().to(store), _to(kwargs, store)))
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


def run_layerwise(
    model: nn.Module,
    structure: ModelStructure,
    calibration: Iterable[torch.Tensor],
    on_layer: Callable[[int, Callable[[], None]], None],
    *,
    device: torch.device | str | None = None,
    store: str = "device",
    progress: bool = True,
) -> None:
    """Call ``on_layer(index, forward_all)`` for each decoder layer in order.

    ``forward_all(stop_at=None)`` runs every calibration batch through that layer (with the inputs produced by the
    already processed layers); ``on_layer`` typically attaches statistics hooks, calls it, and prunes the layer.
    Then the layer's outputs are recomputed with its pruned weights and fed to the next layer. ``device``: where
    layers are computed (default: where the model is); layers found elsewhere are moved there one at a time and
    back.
    """
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    store_dev = dev if store == "device" else torch.device("cpu")
    was_training = model.training
    model.eval()
    if dev != home:
        _move_except(model, structure.layers, dev)
    try:
        inputs = capture_inputs(model, structure, calibration, dev, store_dev)
        bar = tqdm(range(structure.num_layers), desc="layers", unit="layer", disable=not progress)
        for i in bar:
            layer = structure.layers[i]
            layer_home = next(layer.parameters()).device
            layer.to(dev)

            def forward_all(stop_at: nn.Module | None = None, layer=layer, inputs=inputs):
                # stop_at: a module whose inputs are the last thing wanted (e.g. the MLP's output projection, once
                # its input statistics are taken): its pre-hook ends the pass, saving that matmul.
                handle = None
                if stop_at is not None:
                    handle = stop_at.register_forward_pre_hook(_raise_stop)
                try:
                    with torch.no_grad():
                        for hidden, kwargs in inputs:
                            try:
                                layer(hidden.to(dev), **_to(kwargs, dev))
                            except _StopForward:
                                pass
                finally:
                    if handle is not None:
                        handle.remove()

            on_layer(i, forward_all)
            if i == structure.num_layers - 1:  # nothing reads the last layer's outputs
                layer.to(layer_home)
                break
            with torch.no_grad():
                inputs = [
                    (layer_output(layer(h.to(dev), **_to(kw, dev))).to(store_dev), kw) for h, kw in inputs
                ]
            layer.to(layer_home)
    finally:
        if dev != home:
            _move_except(model, structure.layers, home)
        model.train(was_training)
