"""The family tables: where each architecture keeps its decoder layers, projections, experts and routers."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class FamilySpec:
    """Where an architecture keeps its prunable parts. Paths are dotted attribute paths.

    ``layers`` is relative to the causal-LM object; the projection paths are relative to one decoder layer.
    ``mlp_in`` are the projections whose *rows* are the MLP neurons (gate and up, or fc1); ``mlp_out`` is the one
    whose *columns* are (down, or fc2).

    Fused projections are declared by repeating a path: a path listed ``n`` times in ``mlp_in`` is one Linear whose
    rows are ``n`` equal consecutive chunks in that order (Phi-3's ``gate_up_proj``: neuron ``i`` is rows ``i`` and
    ``I + i``); ``q``, ``k`` and ``v`` naming one Linear is a fused ``[q heads | k heads | v heads]`` projection
    (Phi-3's ``qkv_proj``), or, with ``qkv_per_head``, one whose rows are ``[q, k, v]`` per head (GPT-NeoX's
    ``query_key_value``, multi-head attention only).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    embeddings: tuple[str, ...]
    lm_head: str = "lm_head"
    # config attribute that says the block is pre-norm (None: always pre-norm). Removing a whole layer is only an
    # identity for pre-norm blocks, where the residual stream bypasses the block.
    pre_norm_attr: str | None = None
    # config attributes holding the per-layer widths, used by surgery when it rewrites the config
    intermediate_attr: str = "intermediate_size"
    qkv_per_head: bool = False
    # False: the attention normalises q and k over all heads at once (OLMoE's q_norm/k_norm over the whole
    # projection), so removing a head would change the others: no head groups
    head_groups: bool = True
    # mixture of experts ("": none). ``experts`` is the module holding the experts as 3-D parameters,
    # ``expert_in`` [E, 2I, H] (gate rows then up rows) and ``expert_out`` [E, H, I]; ``router`` the module whose
    # ``weight`` [E, H] scores them. A family whose layers have no dense MLP leaves ``mlp_in`` / ``mlp_out`` empty;
    # Qwen2-MoE's are its shared expert's.
    experts: str = ""
    router: str = ""
    expert_in: str = "gate_up_proj"
    expert_out: str = "down_proj"
    experts_attr: str = "num_experts"  # config attributes: experts per layer, neurons per expert
    expert_intermediate_attr: str = "moe_intermediate_size"
    # how the router turns its logits into the top-k weights: a softmax over every expert, the top k of it, and
    # (where the router's attribute ``router_norm`` is true, or always when it is "") those k renormalised to sum 1
    router_norm: str = "norm_topk_prob"

    @property
    def has_mlp(self) -> bool:
        """Whether the decoder layers have a dense MLP (or a shared expert) besides any experts."""
        return bool(self.mlp_out)

    @property
    def fused_qkv(self) -> bool:
        """Whether q, k and v are rows of one Linear."""
        return self.q == self.k == self.v


FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Declare a new architecture family. ``spec.model_types`` are matched against ``config.model_type``."""
    FAMILIES[spec.name] = spec
    return spec


def _llama_like(name: str, model_types: tuple[str, ...]) -> FamilySpec:
    return FamilySpec(
        name=name,
        model_types=model_types,
        layers="model.layers",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out="mlp.down_proj",
        embeddings=("model.embed_tokens",),
    )


register_family(_llama_like("llama", ("llama",)))
register_family(_llama_like("mistral", ("mistral",)))
register_family(_llama_like("qwen2", ("qwen2",)))
# Qwen3's q_norm/k_norm act on head_dim and are shared by all heads, so removing heads leaves them untouched.
register_family(_llama_like("qwen3", ("qwen3",)))
register_family(
    FamilySpec(
        name="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        pre_norm_attr="do_layer_norm_before",
        intermediate_attr="ffn_dim",
    )
)
# Gemma 2/3's extra norms (pre/post feed-forward, q/k norms over head_dim) act on the hidden size or on one head:
# removing neurons or heads leaves them untouched, as Qwen3's.
register_family(_llama_like("gemma", ("gemma",)))
register_family(_llama_like("gemma2", ("gemma2",)))
register_family(_llama_like("gemma3", ("gemma3_text",)))
register_family(
    replace(
        _llama_like("phi3", ("phi3",)),  # Phi-3 and the Phi-4 checkpoints that use its class
        q="self_attn.qkv_proj",
        k="self_attn.qkv_proj",
        v="self_attn.qkv_proj",
        mlp_in=("mlp.gate_up_proj", "mlp.gate_up_proj"),
    )
)
register_family(
    FamilySpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        q="attention.query_key_value",
        k="attention.query_key_value",
        v="attention.query_key_value",
        o="attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        embeddings=("gpt_neox.embed_in",),
        qkv_per_head=True,
    )
)


def _moe(name: str, model_types: tuple[str, ...], **fields) -> FamilySpec:
    """A Llama-like attention with a mixture of experts in place of the MLP (transformers' 3-D expert layout)."""
    return replace(
        _llama_like(name, model_types),
        mlp_in=(),
        mlp_out="",
        intermediate_attr="",
        experts="mlp.experts",
        router="mlp.gate",
        **fields,
    )


register_family(
    _moe(
        "mixtral",
        ("mixtral",),
        experts_attr="num_local_experts",
        expert_intermediate_attr="intermediate_size",
        router_norm="",  # Mixtral always renormalises its top-k weights
    )
)
register_family(_moe("qwen3_moe", ("qwen3_moe",)))
register_family(_moe("olmoe", ("olmoe",), expert_intermediate_attr="intermediate_size", head_groups=False))
# Qwen2-MoE: the shared expert is the layer's dense MLP (its neurons are mlp_neuron groups); its sigmoid gate is
# a Linear of one row, left whole
register_family(
    replace(
        _moe("qwen2_moe", ("qwen2_moe",)),
        mlp_in=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
        mlp_out="mlp.shared_expert.down_proj",
        intermediate_attr="shared_expert_intermediate_size",
    )
)


class UnsupportedModelError(ValueError):
    pass


def family_of(model: nn.Module) -> FamilySpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(sorted(t for s in FAMILIES.values() for t in s.model_types))
    raise UnsupportedModelError(
        f"model_type={model_type!r} is not a supported architecture family (supported: {supported}). "
        "HINT: declare it with pruning.structure.register_family(FamilySpec(name=..., model_types=(...,), "
        "layers='model.layers', q=..., k=..., v=..., o=..., mlp_in=(...), mlp_out=..., embeddings=(...))) "
        "giving the dotted paths of its decoder layers and projections."
    )


def config_value(cfg, name: str, default=None):
    """A config attribute, also the global value of a per-layer (heterogeneous) config, which refuses plain reads."""
    getter = getattr(cfg, "_getattr_without_heterogeneous_validation", None)
    return getter(name, default) if getter is not None else getattr(cfg, name, default)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)
