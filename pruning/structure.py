"""What a decoder-only causal LM offers to prune: linear weights, MLP neurons, attention groups, layers.

Each supported architecture family is declared by one :class:`FamilySpec` table: where the decoder layers live
and which projections make up attention and the MLP. Criteria, masks and surgery never walk attribute chains of
their own; they read the :class:`ModelStructure` built from the table. Adding a family is one
:func:`register_family` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

GroupKind = Literal["mlp_neuron", "attention_head", "query_head", "layer"]


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


@dataclass(frozen=True)
class Member:
    """One tensor of a group set: group ``g`` owns ``[offset + g*size, offset + (g+1)*size)`` along ``dim`` of
    parameter ``name``. ``offset`` > 0, or groups covering less than the whole axis, make the member a slice of a fused
    projection (Phi-3's ``gate_up_proj`` is two members, at offsets 0 and I); the rest of the axis is untouched."""

    name: str
    dim: int
    size: int
    offset: int = 0

    def per_group(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """``tensor`` (shaped like the parameter) as ``[count, size * rest]``: one row per group."""
        t = tensor.movedim(self.dim, 0) if self.dim else tensor
        if self.offset or t.shape[0] != count * self.size:
            t = t.narrow(0, self.offset, count * self.size)
        return t.reshape(count, -1)

    def aligned(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """A 2-D member's ``tensor`` as ``[count, other]``: summed over each group's own rows (columns), the other
        axis kept (a view when a group is one row)."""
        t = tensor.movedim(self.dim, 0) if self.dim else tensor
        if self.offset or t.shape[0] != count * self.size:
            t = t.narrow(0, self.offset, count * self.size)
        return t if self.size == 1 else t.reshape(count, -1, t.shape[-1]).sum(1)

    def factor(self, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Broadcastable keep factor for a tensor of ``shape`` from the group keep-vector ``keep`` (kept outside
        the member's slice)."""
        vec = keep.repeat_interleave(self.size)
        if vec.numel() != shape[self.dim]:
            full = torch.ones(shape[self.dim], dtype=vec.dtype, device=vec.device)
            full[self.offset : self.offset + vec.numel()] = vec
            vec = full
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        return vec.view(view)

    def positions(self, groups: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` of the groups ``groups`` (a 1-D index tensor)."""
        groups = groups.reshape(-1)
        steps = torch.arange(self.size, device=groups.device)
        return (self.offset + groups[:, None] * self.size + steps[None, :]).flatten()

    def as_list(self) -> list:
        """``[name, dim, size]`` (and the offset when there is one): how masks store the member."""
        out = [self.name, self.dim, self.size]
        return out + [self.offset] if self.offset else out


@dataclass(frozen=True)
class GroupSet:
    """The ``count`` coupled groups of one kind in one decoder layer (e.g. its 8192 MLP neurons).

    ``partitions`` > 1 means groups come in that many equal consecutive partitions that must keep the same count
    each (query heads sharing KV groups: the model can only express the same number of query heads per group).
    """

    kind: GroupKind
    layer: int
    count: int
    members: tuple[Member, ...]
    partitions: int = 1
    numels: tuple[int, ...] = ()  # total element count of each member tensor

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def params_per_group(self) -> int:
        """Parameters removed with one group."""
        return sum(self.numels) // self.count


@dataclass
class LayerInfo:
    index: int
    module: nn.Module
    prefix: str  # parameter-name prefix, e.g. "model.layers.3."
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # full module name -> Linear


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by name, with PEFT's wrapped names also reachable by their original ones: after LoRA injection
    ``...q_proj.weight`` lives at ``...q_proj.base_layer.weight`` (the same Parameter object), so masks and
    statistics named before the injection keep resolving."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in list(params):
        if ".base_layer." in name:
            params.setdefault(name.replace(".base_layer.", "."), params[name])
    return params


class ModelStructure:
    """The prunable parts of one model, discovered from its family table.

    ``targets()`` are the unstructured targets (every ``nn.Linear`` inside the decoder layers; embeddings and the
    LM head on request). ``group_sets(kind)`` are the structured groups, one :class:`GroupSet` per layer.
    """

    def __init__(self, model: nn.Module, family: FamilySpec | None = None):
        self.model = model
        self.family = family or family_of(model)
        self.config = model.config
        self.layers: nn.ModuleList = get_submodule(model, self.family.layers)  # type: ignore[assignment]
        self.num_layers = len(self.layers)
        if not self.num_layers:
            raise UnsupportedModelError(
                f"this {self.family.name} model has no decoder layers (num_hidden_layers="
                f"{config_value(model.config, 'num_hidden_layers', 0)}): there is nothing to prune. HINT: load the "
                "model with its layers (check the config's num_hidden_layers)"
            )
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.layer_infos: list[LayerInfo] = []
        for i, layer in enumerate(self.layers):
            prefix = f"{self.family.layers}.{i}."
            linears = {prefix + n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n}
            self.layer_infos.append(LayerInfo(i, layer, prefix, linears))
        self._check_family()
        # head counts are read off each layer's modules (a compacted model's layers may differ; its per-layer
        # config refuses global reads); the model-wide counts are the widest layer's
        self.head_dim = self._head_dim()
        self.num_heads = max(self.heads(i) for i in range(self.num_layers))
        self.num_kv_heads = max(self.kv_heads(i) for i in range(self.num_layers))
        for i in range(self.num_layers):
            if self.heads(i) % self.kv_heads(i):
                raise UnsupportedModelError(
                    f"layer {i}: {self.heads(i)} attention heads is not a multiple of {self.kv_heads(i)} KV heads"
                )

    def _check_family(self) -> None:
        fam = self.family
        for path in (fam.q, fam.k, fam.v, fam.o, *fam.mlp_in, fam.mlp_out):
            try:
                mod = self.layers[0].get_submodule(path)
            except AttributeError as err:
                raise UnsupportedModelError(
                    f"family {fam.name!r} expects a Linear at '<layer>.{path}' but "
                    f"{type(self.layers[0]).__name__} has none. HINT: the model's code changed or the family "
                    "table is wrong; fix the path in its FamilySpec."
                ) from err
            if not isinstance(mod, nn.Linear):
                raise UnsupportedModelError(f"'<layer>.{path}' is {type(mod).__name__}, expected nn.Linear")

    def _head_dim(self) -> int:
        """The attention modules' head width (``head_dim``, GPT-NeoX's ``head_size``), else the config's."""
        attn = self.layers[0].get_submodule(self.family.o.rpartition(".")[0])
        for attr in ("head_dim", "head_size"):
            if isinstance(getattr(attn, attr, None), int):
                return int(getattr(attn, attr))
        cfg = self.config
        return int(config_value(cfg, "head_dim") or cfg.hidden_size // int(config_value(cfg, "num_attention_heads")))

    def heads(self, layer: int) -> int:
        """Query heads of decoder layer ``layer`` (from its output projection's width)."""
        return self.linear(layer, self.family.o).in_features // self.head_dim

    def kv_heads(self, layer: int) -> int:
        """Key/value heads of decoder layer ``layer`` (from its key projection's rows)."""
        fam = self.family
        if fam.qkv_per_head:
            return self.heads(layer)
        rows = self.linear(layer, fam.k).out_features
        if fam.fused_qkv:
            return (rows - self.heads(layer) * self.head_dim) // (2 * self.head_dim)
        return rows // self.head_dim

    def intermediate(self, layer: int) -> int:
        """MLP neurons of decoder layer ``layer``."""
        return self.linear(layer, self.family.mlp_out).in_features

    # ------------------------------------------------------------------ names and lookups
    def param(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def linear(self, layer: int, path: str) -> nn.Linear:
        return self.layers[layer].get_submodule(path)  # type: ignore[return-value]

    def lname(self, layer: int, path: str) -> str:
        return f"{self.family.layers}.{layer}.{path}"

    def layer_of(self, name: str) -> int | None:
        prefix = self.family.layers + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix) :].split(".", 1)[0])

    @property
    def pre_norm(self) -> bool:
        attr = self.family.pre_norm_attr
        return True if attr is None else bool(getattr(self.config, attr, True))

    # ------------------------------------------------------------------ unstructured targets
    def targets(self, include_embeddings: bool = False, include_lm_head: bool = False) -> dict[str, nn.Module]:
        """Modules whose ``.weight`` is an unstructured target, by module name (weights are ``name + '.weight'``)."""
        out: dict[str, nn.Module] = {}
        for info in self.layer_infos:
            out.update(info.linears)
        if include_embeddings:
            for path in self.family.embeddings:
                out[path] = get_submodule(self.model, path)
        if include_lm_head:
            head = get_submodule(self.model, self.family.lm_head)
            tied = any(head.weight is get_submodule(self.model, p).weight for p in self.family.embeddings)
            if not (tied and include_embeddings):
                out[self.family.lm_head] = head
        return out

    # ------------------------------------------------------------------ structured groups
    def _members_rows(self, layer: int, path: str, size: int, offset: int = 0) -> list[Member]:
        lin = self.linear(layer, path)
        base = self.lname(layer, path)
        out = [Member(base + ".weight", 0, size, offset)]
        if lin.bias is not None:
            out.append(Member(base + ".bias", 0, size, offset))
        return out

    def _finish(self, gs: GroupSet) -> GroupSet:
        """The set with each member's element count: its slice of the parameter, for a fused one."""
        numels = []
        for m in gs.members:
            p = self.param(m.name)
            numels.append(p.numel() // p.shape[m.dim] * gs.count * m.size)
        return replace(gs, numels=tuple(numels))

    def _neuron_members(self, layer: int) -> list[Member]:
        """Neuron i: row i of each ``mlp_in`` chunk (a path listed n times is n chunks of one Linear), column i of
        ``mlp_out``."""
        fam, width = self.family, self.intermediate(layer)
        members = []
        for j, path in enumerate(fam.mlp_in):
            chunk = fam.mlp_in[:j].count(path)
            members += self._members_rows(layer, path, 1, chunk * width)
        members.append(Member(self.lname(layer, fam.mlp_out) + ".weight", 1, 1))
        return members

    def _qkv_members(self, layer: int, q_size: int, kv: bool) -> list[Member]:
        """Rows of a KV group (``q_size`` query rows each, and its key and value rows when ``kv``) or of a query
        head: in q/k/v Linears of their own, or in a fused one."""
        fam, hd = self.family, self.head_dim
        if fam.qkv_per_head:  # [q, k, v] rows of each head: a KV group (= a head) is 3 * head_dim rows
            return self._members_rows(layer, fam.q, 3 * hd if kv else hd)
        k_at, v_at = (
            (self.heads(layer) * hd, (self.heads(layer) + self.kv_heads(layer)) * hd) if fam.fused_qkv else (0, 0)
        )
        members = self._members_rows(layer, fam.q, q_size)
        if kv:
            members += self._members_rows(layer, fam.k, hd, k_at)
            members += self._members_rows(layer, fam.v, hd, v_at)
        return members

    def group_sets(self, kind: GroupKind) -> list[GroupSet]:
        """One :class:`GroupSet` of ``kind`` per decoder layer.

        - ``mlp_neuron``: neuron i = row i of every ``mlp_in`` projection (weight and bias; of each chunk of a
          fused one) and column i of ``mlp_out``.
        - ``attention_head``: a KV group = its k and v rows, the q rows of the query heads that share it and the
          matching o columns. For models without GQA this is exactly one attention head.
        - ``query_head``: one query head = its q rows and o columns; heads come in ``num_kv_heads`` partitions
          that must keep equal counts, so the pruned model still has a whole number of heads per KV group.
        - ``layer``: the whole decoder block (all its Linear weights and biases), one group per layer.
        """
        fam = self.family
        sets = []
        hd = self.head_dim
        for layer in range(self.num_layers):
            rep = self.heads(layer) // self.kv_heads(layer)
            if kind == "mlp_neuron":
                sets.append(GroupSet("mlp_neuron", layer, self.intermediate(layer), tuple(self._neuron_members(layer))))
            elif kind == "attention_head":
                members = self._qkv_members(layer, rep * hd, kv=True)
                members.append(Member(self.lname(layer, fam.o) + ".weight", 1, rep * hd))
                sets.append(GroupSet("attention_head", layer, self.kv_heads(layer), tuple(members)))
            elif kind == "query_head":
                if rep == 1:
                    raise ValueError(
                        "granularity='query_head' needs grouped-query attention (several query heads per KV head);"
                        f" layer {layer} of this model has {self.heads(layer)} heads and {self.kv_heads(layer)} KV "
                        "heads. HINT: use granularity='attention_head'."
                    )
                members = self._qkv_members(layer, hd, kv=False)
                members.append(Member(self.lname(layer, fam.o) + ".weight", 1, hd))
                sets.append(
                    GroupSet("query_head", layer, self.heads(layer), tuple(members), partitions=self.kv_heads(layer))
                )
            elif kind == "layer":
                if not self.pre_norm:
                    raise ValueError(
                        "granularity='layer' needs pre-norm decoder blocks (a removed block must be an identity); "
                        f"this {fam.name} model is post-norm ({fam.pre_norm_attr}=False)."
                    )
                members = []
                for name, lin in self.layer_infos[layer].linears.items():
                    members.append(Member(name + ".weight", 0, lin.out_features))
                    if lin.bias is not None:
                        members.append(Member(name + ".bias", 0, lin.out_features))
                sets.append(GroupSet("layer", layer, 1, tuple(members)))
            else:
                raise ValueError(
                    f"group kind={kind!r} is not one of 'mlp_neuron', 'attention_head', 'query_head', 'layer'"
                )
        return [self._finish(gs) for gs in sets]

    def group_view(self, tensor: torch.Tensor, member: Member, count: int) -> torch.Tensor:
        """View ``tensor`` (shaped like the member's parameter) as ``[count, size * rest]``: one row per group."""
        return member.per_group(tensor, count)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
