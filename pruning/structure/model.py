"""The prunable parts of one model, read off its family table and its modules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .families import FamilySpec, UnsupportedModelError, config_value, family_of, get_submodule
from .members import GroupKind, GroupSet, Member


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
        for path in (fam.q, fam.k, fam.v, fam.o, *fam.mlp_in, *([fam.mlp_out] if fam.has_mlp else [])):
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
        """MLP neurons of decoder layer ``layer`` (its dense MLP's or shared expert's; 0 without)."""
        return self.linear(layer, self.family.mlp_out).in_features if self.family.has_mlp else 0

    # ------------------------------------------------------------------ experts
    def expert_params(self, layer: int) -> list[str]:
        """The router weight and the expert weights of decoder layer ``layer`` (none without experts)."""
        fam = self.family
        if not fam.experts:
            return []
        try:
            self.layers[layer].get_submodule(fam.experts)
        except AttributeError:
            return []  # a dense layer of a model that has experts in others
        experts = self.lname(layer, fam.experts)
        return [self.lname(layer, fam.router) + ".weight", f"{experts}.{fam.expert_in}", f"{experts}.{fam.expert_out}"]

    def num_experts(self, layer: int) -> int:
        """Routed experts of decoder layer ``layer`` (0 without)."""
        names = self.expert_params(layer)
        return self.param(names[2]).shape[0] if names else 0

    def expert_width(self, layer: int) -> int:
        """Neurons of each routed expert of decoder layer ``layer`` (0 without experts)."""
        names = self.expert_params(layer)
        return self.param(names[2]).shape[2] if names else 0

    def _moe_params(self, layer: int, granularity: str) -> list[str]:
        names = self.expert_params(layer)
        if not names:
            raise ValueError(
                f"granularity={granularity!r} prunes routed experts; layer {layer} of this {self.family.name} model "
                "has none. HINT: use 'mlp_neuron' for dense MLPs (every layer must have experts here)."
            )
        return names

    def _experts(self, layer: int) -> GroupSet:
        members = tuple(Member(name, 0, 1) for name in self._moe_params(layer, "expert"))
        return GroupSet("expert", layer, self.num_experts(layer), members)

    def _expert_neurons(self, layer: int) -> GroupSet:
        _, w_in, w_out = self._moe_params(layer, "expert_neuron")
        n, width = self.num_experts(layer), self.expert_width(layer)
        members = (Member(w_in, 1, 1, 0, n), Member(w_in, 1, 1, width, n), Member(w_out, 2, 1, 0, n))
        return GroupSet("expert_neuron", layer, n * width, members, partitions=n)

    def widths(self, layer: int) -> dict[str, int]:
        """Decoder layer ``layer``'s widths by the config attribute that states them."""
        fam = self.family
        out = {"num_attention_heads": self.heads(layer), "num_key_value_heads": self.kv_heads(layer)}
        if fam.has_mlp:
            out[fam.intermediate_attr] = self.intermediate(layer)
        if self.expert_params(layer):
            out[fam.experts_attr] = self.num_experts(layer)
            out[fam.expert_intermediate_attr] = self.expert_width(layer)
        return out

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
            numels.append(p.numel() // (p.shape[m.dim] * max(m.experts, 1)) * gs.count * m.size)
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

    def group_sets(self, kind: GroupKind, layers: Iterable[int] | None = None) -> list[GroupSet]:
        """One :class:`GroupSet` of ``kind`` per decoder layer (of ``layers`` only, when given).

        - ``mlp_neuron``: neuron i = row i of every ``mlp_in`` projection (weight and bias; of each chunk of a
          fused one) and column i of ``mlp_out`` (Qwen2-MoE: its shared expert's).
        - ``attention_head``: a KV group = its k and v rows, the q rows of the query heads that share it and the
          matching o columns. For models without GQA this is exactly one attention head.
        - ``query_head``: one query head = its q rows and o columns; heads come in ``num_kv_heads`` partitions
          that must keep equal counts, so the pruned model still has a whole number of heads per KV group.
        - ``layer``: the whole decoder block (all its Linear weights and biases, its experts and router), one group
          per layer.
        - ``expert``: one routed expert = its slice of the expert weights and its router row.
        - ``expert_neuron``: neuron i of expert e = its gate and up rows and down column; experts are partitions
          that keep equal counts, so every expert of a layer keeps one width (a stock config).
        """
        builders = {
            "mlp_neuron": self._mlp_neurons,
            "attention_head": self._kv_groups,
            "query_head": self._query_heads,
            "layer": self._whole_layer,
            "expert": self._experts,
            "expert_neuron": self._expert_neurons,
        }
        if kind not in builders:
            raise ValueError(f"group kind={kind!r} is not one of {sorted(builders)}")
        wanted = range(self.num_layers) if layers is None else layers
        return [self._finish(builders[kind](layer)) for layer in wanted]

    def _mlp_neurons(self, layer: int) -> GroupSet:
        if not self.family.has_mlp:
            raise ValueError(
                f"granularity='mlp_neuron' prunes a dense MLP; this {self.family.name} model's MLPs are experts. "
                "HINT: use granularity='expert_neuron' (neurons inside each expert) or 'expert' (whole experts)."
            )
        return GroupSet("mlp_neuron", layer, self.intermediate(layer), tuple(self._neuron_members(layer)))

    def _check_heads(self) -> None:
        if not self.family.head_groups:
            raise ValueError(
                f"{self.family.name}'s attention normalises q and k over all heads at once, so no head can be removed "
                "without changing the others. HINT: prune MLP neurons, experts or layers of this family."
            )

    def _kv_groups(self, layer: int) -> GroupSet:
        self._check_heads()
        size = self.heads(layer) // self.kv_heads(layer) * self.head_dim
        members = self._qkv_members(layer, size, kv=True)
        members.append(Member(self.lname(layer, self.family.o) + ".weight", 1, size))
        return GroupSet("attention_head", layer, self.kv_heads(layer), tuple(members))

    def _query_heads(self, layer: int) -> GroupSet:
        self._check_heads()
        if self.heads(layer) == self.kv_heads(layer):
            raise ValueError(
                "granularity='query_head' needs grouped-query attention (several query heads per KV head);"
                f" layer {layer} of this model has {self.heads(layer)} heads and {self.kv_heads(layer)} KV "
                "heads. HINT: use granularity='attention_head'."
            )
        members = self._qkv_members(layer, self.head_dim, kv=False)
        members.append(Member(self.lname(layer, self.family.o) + ".weight", 1, self.head_dim))
        return GroupSet("query_head", layer, self.heads(layer), tuple(members), partitions=self.kv_heads(layer))

    def _whole_layer(self, layer: int) -> GroupSet:
        if not self.pre_norm:
            raise ValueError(
                "granularity='layer' needs pre-norm decoder blocks (a removed block must be an identity); "
                f"this {self.family.name} model is post-norm ({self.family.pre_norm_attr}=False)."
            )
        members = []
        for name, lin in self.layer_infos[layer].linears.items():
            members.append(Member(name + ".weight", 0, lin.out_features))
            if lin.bias is not None:
                members.append(Member(name + ".bias", 0, lin.out_features))
        for name in self.expert_params(layer):
            members.append(Member(name, 0, self.param(name).shape[0]))
        return GroupSet("layer", layer, 1, tuple(members))

    def group_view(self, tensor: torch.Tensor, member: Member, count: int) -> torch.Tensor:
        """View ``tensor`` (shaped like the member's parameter) as ``[count, size * rest]``: one row per group."""
        return member.per_group(tensor, count)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
