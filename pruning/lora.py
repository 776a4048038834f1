"""LoRA recovery (PEFT) that obeys the masks — everything LoRA-specific in one place.

- :func:`inject`: adapters on the targeted Linears, each adapter's update masked like the weight it adapts, so the
  model trained and validated is the one that the merge produces;
- :func:`merge`: the adapters merged into the base weights and dropped, then the masks re-applied (a merge adds
  ``B·A`` to every entry, pruned ones included);
- :func:`base_layers`: PEFT's wrappers swapped back for the ``nn.Linear`` they wrap while the structure is read and
  scores are computed.

The base weights stay the same ``Parameter`` objects (renamed ``...base_layer.weight`` by PEFT), so masks and
statistics made before the injection keep holding (:func:`pruning.structure.named_parameters` resolves both names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .masks import MaskSet

MasksOf = Callable[[], MaskSet | None]


@dataclass
class LoraSettings:
    """LoRA recovery (PEFT). SDMPrune's: r=8, alpha=16, dropout=0.05 on q,k,v,o,gate,up,down."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge_at_end: bool = True

    @classmethod
    def of(cls, value: LoraSettings | dict | None) -> LoraSettings | None:
        """The settings from what a config gives: the dataclass, a dict of its fields (LightningCLI's hyper-parameters
        hold a dict), or ``None``.

        FIX: under LightningCLI ``hparams.lora`` is a dict and the end-of-fit merge read ``.merge_at_end`` from it, so
        every LoRA recovery run through the CLI ended in a traceback after training."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"model.lora={value!r} must be a mapping of LoraSettings fields or null")
        unknown = set(value) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(
                f"model.lora has unknown keys {sorted(unknown)}; LoraSettings takes {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**value)


# checkpoints of a module built with lora=LoraSettings(...) hold it in their hyper-parameters; it is plain data, so it
# may be rebuilt by torch.load(weights_only=True) (resume, `pruning eval x.ckpt`)
torch.serialization.add_safe_globals([LoraSettings])


def inject(model: nn.Module, settings: LoraSettings, masks: MasksOf) -> nn.Module:
    """PEFT's LoRA adapters on ``model`` (wrapped in place; returns the ``PeftModel``), every adapter's update
    masked by ``masks()`` as read at each forward, so later pruning events are followed."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            for adapter in mod.lora_A:
                mask_adapter(name + ".weight", mod.base_layer.weight, mod.lora_A[adapter], mod.lora_B[adapter], masks)
    return peft_model


def _split_factors(masks: MaskSet | None, name: str, weight: torch.Tensor) -> tuple:
    """``(rows, cols, elem)``: the keep factors of ``name`` by kind (``None`` where there is none)."""
    if masks is None or name not in masks.names():
        return None, None, None
    rows = cols = elem = None
    for f in masks.factors(name, weight):
        if f.shape == weight.shape:
            elem = f if elem is None else elem & f
        elif f.shape[0] == weight.shape[0]:
            rows = f.reshape(-1) if rows is None else rows & f.reshape(-1)
        else:
            cols = f.reshape(-1) if cols is None else cols & f.reshape(-1)
    return rows, cols, elem


def mask_adapter(name: str, weight: torch.Tensor, lora_a: nn.Module, lora_b: nn.Module, masks: MasksOf) -> None:
    """Make the adapter's update obey the masks of the weight it adapts: the layer computes ``(W + s·BA) ⊙ M``.

    FIX: masks zero ``W`` (frozen under LoRA) but the adapter path ``s·B·A·x`` is dense, so during recovery the
    pruned weights were effectively revived, and the model trained and validated was not the one written after the
    merge (which adds ``s·BA`` and re-zeroes the pruned entries): on a tiny Llama with 50 % unstructured masks the
    logits moved by 0.2 at the merge. Row factors of the mask (pruned outputs: MLP neurons' gate/up rows, heads'
    q/k/v rows) scale the adapter's output, column factors (down/o columns) its input, at no cost; element masks
    (unstructured, N:M) need the dense ``(B·A) ⊙ M``, computed per forward from the adapter's input. Without masks on
    this weight the adapter runs untouched.
    """
    state: dict[str, torch.Tensor | None] = {}

    def before_a(module, args):
        state.clear()
        rows, cols, elem = _split_factors(masks(), name, weight)
        x = args[0]
        if cols is not None:
            x = x * cols.to(x.dtype)
        if elem is not None:
            state["x"] = x
        state["rows"], state["elem"] = rows, elem
        return (x, *args[1:]) if cols is not None else None

    def after_b(module, args, out):
        rows, elem, x = state.pop("rows", None), state.pop("elem", None), state.pop("x", None)
        if elem is not None:
            delta = lora_b.weight @ lora_a.weight  # [out, in]: the update the merge will add (before scaling)
            out = torch.nn.functional.linear(x.to(delta.dtype), delta * elem.to(delta.dtype))
        if rows is not None:
            out = out * rows.to(out.dtype)
        return out

    lora_a.register_forward_pre_hook(before_a)
    lora_b.register_forward_hook(after_b)


def merge(peft_model: nn.Module, masks: MaskSet | None) -> nn.Module:
    """The adapters merged into the base weights and removed; the masks re-applied to the merged model, which is
    returned (the same modules, unwrapped)."""
    model = peft_model.merge_and_unload()
    if masks is not None:
        if masks.attached:
            masks.reapply()
        else:
            masks.apply(model)
    return model


@contextmanager
def base_layers(model: nn.Module) -> Iterator[None]:
    """PEFT's LoRA wrappers swapped back for the ``nn.Linear`` they wrap (``.base_layer``), restored on exit.

    FIX (LoRA): :class:`~pruning.structure.ModelStructure` accepts only ``nn.Linear`` projections, and PEFT replaces
    every targeted one by a wrapper module, so any event on a module built with ``lora=...`` failed with
    ``UnsupportedModelError: '<layer>.self_attn.q_proj' is Linear, expected nn.Linear``. Structure discovery and
    scoring run on the base layers instead: the same Parameter objects under their original names, so masks,
    statistics and hooks on them (activation pre-hooks fire when the wrapper calls its base layer) keep working once
    the wrappers are back."""
    swapped = []
    for name, mod in list(model.named_modules()):
        base = getattr(mod, "base_layer", None)
        if name and isinstance(base, nn.Module) and hasattr(mod, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped.append((parent, child, mod))
    try:
        for parent, child, mod in swapped:
            setattr(parent, child, mod.base_layer)
        yield
    finally:
        for parent, child, mod in swapped:
            setattr(parent, child, mod)
