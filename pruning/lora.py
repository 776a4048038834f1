"""LoRA recovery (PEFT) that obeys the masks — everything LoRA-specific in one place.

- :func:`inject`: adapters on the targeted Linears, each adapter's update masked like the weight it adapts, so the
  model trained and validated is the one that the merge produces;
- :func:`merge`: the adapters merged into the base weights and dropped, then the masks re-applied (a merge adds
  ``B·A`` to every entry, pruned ones included); on FSDP2-sharded weights each rank adds its own rows of the update,
  ``B[rows]·A`` (:func:`merge_shards`), so no weight is gathered;
- :func:`base_layers`: PEFT's wrappers swapped back for the ``nn.Linear`` they wrap while the structure is read and
  scores are computed.

The base weights stay the same ``Parameter`` objects (renamed ``...base_layer.weight`` by PEFT), so masks and
statistics made before the injection keep holding (:func:`pruning.structure.named_parameters` resolves both names).
"""

from __future__ import annotations

import math
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


def inject(model: nn.Module, settings: LoraSettings, masks: MasksOf, seed: int | None = None) -> nn.Module:
    """PEFT's LoRA adapters on ``model`` (wrapped in place; returns the ``PeftModel``), every adapter's update
    masked by ``masks()`` as read at each forward, so later pruning events are followed. ``seed``: the adapters'
    random initialisation drawn from it (:func:`initial_adapters`), the global generator left as it was.

    FIX (FSDP2): each rank keeps its own rows of every parameter it builds, and nothing broadcasts them (DDP does),
    so adapters drawn from each process's generator made a model no single process had; seeded, every rank (and a
    single process) starts from the same adapters."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        peft_model = get_peft_model(model, cfg)
    if seed is not None:
        with torch.no_grad():
            initial = initial_adapters(model, seed)
            for name, p in model.named_parameters():
                if name in initial and not p.is_meta:  # on meta: written when the model is materialised
                    p.copy_(initial[name].to(p.dtype))
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            for adapter in mod.lora_A:
                mask_adapter(name + ".weight", mod.base_layer.weight, mod.lora_A[adapter], mod.lora_B[adapter], masks)
    return peft_model


def initial_adapters(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' starting values by parameter name, at their global shapes, fp32 on the host: every ``lora_A``
    Kaiming-uniform (``a=√5``, PEFT's default) from one generator seeded by ``seed``, drawn in the order of the sorted
    names; every ``lora_B`` zero (so the adapted model starts as the base model). The same on every rank and on a
    model built on the meta device (whose adapters are written when its weights are loaded)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if ".lora_A." in name:
            out[name] = nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5), generator=g)
        elif ".lora_B." in name:
            out[name] = torch.zeros(p.shape)
    return out


def base_name(name: str) -> str:
    """The name a wrapped layer's base parameter has without PEFT's wrapper (``q_proj.base_layer.weight`` ->
    ``q_proj.weight``): its name in a checkpoint."""
    return name.replace(".base_layer.", ".")


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

    ``weight`` gives only the global shape: under FSDP2 the factors are read for a stand-in of that shape on the
    input's device (the parameter object given here is replaced when the model is sharded), and an element mask
    held as a rank's rows is gathered whole for the forward (a collective every rank runs in the same order).
    """
    state: dict[str, torch.Tensor | None] = {}
    shape = tuple(weight.shape)

    def before_a(module, args):
        state.clear()
        x = args[0]
        like = x.new_empty(()).expand(shape)  # the weight's shape and the input's device, no storage
        rows, cols, elem = _split_factors(masks(), name, like)
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
    returned (the same modules, unwrapped). Sharded (FSDP2) adapters are merged on each rank's rows
    (:func:`merge_shards`), then unwrapped."""
    from .distributed import is_sharded

    if is_sharded(peft_model.base_model.model):
        merge_shards(peft_model)
        model = peft_model.unload()
    else:
        model = peft_model.merge_and_unload()
    if masks is not None:
        if masks.attached:
            masks.reapply()
        else:
            masks.apply(model)
    return model


@torch.no_grad()
def merge_shards(peft_model: nn.Module) -> None:
    """Every adapter's update ``s·B·A`` added in place to the rows of its base weight that this rank stores (the
    adapters stay; :meth:`unload` drops them). For a weight sharded by rows (FSDP2 ``Shard(0)``) the update of rows
    ``[i, j)`` is ``s·B[i:j]·A``: ``B`` (``[out, r]``) is sharded like the weight (the same rows of the same number of
    rows on the same mesh), so its local rows are the ones needed, and ``A`` (``[r, in]``, small) is gathered whole.
    Collective when ``A`` is sharded (every rank merges the same adapters in the same order). A weight that is not
    sharded gets the whole update."""
    from .distributed import is_dtensor, local, local_rows

    for name, mod in sorted(peft_model.base_model.model.named_modules(), key=lambda kv: kv[0]):
        if not (hasattr(mod, "lora_A") and hasattr(mod, "base_layer")):
            continue
        weight = mod.base_layer.weight
        for adapter in sorted(mod.lora_A.keys()):
            extras = [k for k in ("use_dora", "lora_bias") if getattr(mod, k, {}).get(adapter, False)]
            if extras or getattr(mod, "fan_in_fan_out", False):
                raise NotImplementedError(
                    f"{name}: merging adapters with {extras or ['fan_in_fan_out']} on sharded weights is not "
                    "supported. HINT: use plain LoRA (no DoRA, no LoRA bias) on nn.Linear projections"
                )
            a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            a_full = a.full_tensor() if is_dtensor(a) else a
            if is_dtensor(weight) and local_rows(b) != local_rows(weight):
                raise RuntimeError(f"{name}: lora_B rows {local_rows(b)} are not the weight's {local_rows(weight)}")
            b_rows = local(b) if is_dtensor(weight) else (b.full_tensor() if is_dtensor(b) else b)
            w = local(weight)
            delta = (b_rows.to(torch.float32) @ a_full.to(device=b_rows.device, dtype=torch.float32)) * float(
                mod.scaling[adapter]
            )
            w.add_(delta.to(device=w.device, dtype=w.dtype))


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
