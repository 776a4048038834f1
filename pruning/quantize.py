"""Frozen Linear weights held as int8 (SAAP's group fine-tuning: the groups not being trained are quantized).

:func:`freeze_int8` quantizes a Linear's weight per output row, symmetric int8 (zero point 0, scale
``max|w_row| / 127``, values ``round(w / scale)`` in ``[−127, 127]``: torch's per-channel affine scheme, so pruned
zeros stay exactly zero) and keeps only the int8 values in the parameter's storage (a quarter of fp32, half of bf16)
with the row scales beside it. (The two lines of arithmetic are written out: torch 2.13 deprecates its quantized
tensors, ``torch.quantize_per_channel``, and torchao / bitsandbytes are not dependencies of this package.) The
Linear then computes with the weight dequantized on the fly, in forward and again in backward (the input's gradient
flows through, so earlier layers can train), so no full-precision copy outlives a call.
:func:`thaw` writes the dequantized values back: the weight carries the int8 rounding (at most half a step per row)
into its next training turn, where it is updated. The parameter object stays the same, so optimisers, masks
(``MaskSet`` re-zeroes int8 data as well) and checkpoints keep pointing at it; it must not require grad while int8.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn
from torch.nn import functional as F

_SCALES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (row scales, original dtype)


class _DequantizedLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with ``W = q · scale`` made from the int8 ``q`` in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(q, scale)
        ctx.has_bias = bias is not None
        return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None], bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scale = ctx.saved_tensors
        grad_x = grad @ (q.to(grad.dtype) * scale.to(grad.dtype)[:, None]) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_b


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    scale, _ = _SCALES[self]
    return _DequantizedLinear.apply(x, self.weight, scale, self.bias)


def is_int8(module: nn.Module) -> bool:
    """Whether :func:`freeze_int8` holds the module's weight as int8."""
    return module in _SCALES


@torch.no_grad()
def freeze_int8(module: nn.Linear) -> None:
    """Hold ``module.weight`` as int8 per output row (see the module docstring); a no-op if it already is."""
    if is_int8(module):
        return
    w = module.weight
    if w.requires_grad:
        raise ValueError(f"{type(module).__name__}.weight requires grad: freeze it (requires_grad_(False)) first")
    scale = (w.detach().float().abs().amax(1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = (w.detach().float() / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    _SCALES[module] = (scale, w.dtype)
    w.data = q  # the same Parameter, now int8 storage
    module.forward = types.MethodType(_int8_forward, module)


@torch.no_grad()
def dequantized(module: nn.Linear) -> torch.Tensor:
    """The weight a :func:`freeze_int8` module computes with, in its original dtype (a new tensor)."""
    scale, dtype = _SCALES[module]
    return (module.weight.float() * scale[:, None]).to(dtype)


@torch.no_grad()
def thaw(module: nn.Linear) -> None:
    """Back to a full-precision weight (its dequantized values) and the Linear's own forward; a no-op if not int8."""
    if not is_int8(module):
        return
    module.weight.data = dequantized(module)
    del _SCALES[module]
    del module.forward  # the instance attribute; the class's forward again
