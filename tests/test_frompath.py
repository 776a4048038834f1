"""Pruning a checkpoint from its path (``pruning.prune(path, ..., save_to=DIR)``): the layers are read one at a
time and written shard by shard, and the export equals in-memory pruning + ``compact`` + ``save_pretrained`` byte
for byte in the weights, for activation and gradient criteria, unstructured, N:M and structured granularities,
uniform, OWL and rates allocations; each layer really leaves memory (``meta``) and returns. Mixture-of-experts
checkpoints hold one tensor per expert (as transformers saves them) where the model stacks them: read and written so,
equal to the in-memory path, and loaded by stock ``from_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import MOE_NAMES, calib, tiny_model

import pruning
from pruning.options import PruneOptions
from pruning.pipeline import Pruner
from pruning.pipeline.streamed import collect_gradients_layerwise
from pruning.surgery.export import is_per_layer_export


def checkpoint(tmp_path: Path, family: str = "llama", dtype=torch.float32, **kw) -> Path:
    model = tiny_model(family, layers=3, seed=0, **kw).to(dtype)
    return pruning.save_pretrained(model, tmp_path / "ckpt")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def in_memory(ckpt: Path, out: Path, data, **kw) -> pruning.PruneResult:
    """The reference: the whole model loaded, pruned, compacted and saved (gradient statistics from the layer-wise
    backward, the same algorithm: the whole-model backward equals it to fp32 rounding, not bit for bit)."""
    return in_memory_model(ckpt, out, data, **kw)[0]


def in_memory_model(ckpt: Path, out: Path, data, **kw) -> tuple[pruning.PruneResult, torch.nn.Module]:
    """:func:`in_memory`, and the pruned, compacted model."""
    model = pruning.load_pretrained(ckpt)
    opts = PruneOptions(**kw)
    gradients = None
    if opts.criterion().needs_gradients:
        gradients = Pruner(model, opts).gradient_collector()
        collect_gradients_layerwise(model, data, gradients, alpha=opts.alpha, temperature=opts.temperature)
        gradients.reduce()
    result = pruning.prune(model, data, options=opts, gradients=gradients, progress=False)
    pruning.compact(model, result.masks)
    pruning.save_pretrained(model, out)
    return result, model


CASES = [
    dict(method="wanda", granularity="unstructured", sparsity=0.5),
    dict(method="wanda", granularity="2:4"),
    dict(method="sparsegpt", granularity="unstructured", sparsity=0.5),
    dict(method="wanda", granularity="mlp_neuron", sparsity=0.5, allocation="owl"),
    dict(method="magnitude", granularity="attention_head", sparsity=0.5),
    dict(method="wanda", granularity="query_head", sparsity=0.5, allocation="rates", layer_rates=[0.0, 0.25, 0.5]),
    dict(method="gblm", granularity="unstructured", sparsity=0.5),
    dict(method="wanda", granularity="mlp_neuron", sparsity=0.5, allocation="global"),
    dict(method="sdm", granularity="attention_head", sparsity=0.25, allocation="global"),
    dict(method="taylor", granularity="unstructured", sparsity=0.5, allocation="owl"),
    dict(method="taylor", granularity="mlp_neuron", sparsity=0.25),
    dict(method="sdm", granularity="mlp_neuron", sparsity=0.25),
    dict(method="saap", granularity="mlp_neuron+attention_head", sparsity=0.25),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: f"{kw['method']}-{kw['granularity']}-{kw.get('allocation', '')}")
def test_path_in_save_to_out_equals_in_memory_compact_save(tmp_path, kw):
    ckpt = checkpoint(tmp_path)
    data = calib(n=4, seq=16, seed=1, batch=2)
    want = in_memory(ckpt, tmp_path / "want", data, **kw)
    got = pruning.prune(str(ckpt), data, **kw, save_to=tmp_path / "got", progress=False)
    w, g = weights(tmp_path / "want"), weights(tmp_path / "got")
    assert set(g) == set(w)
    for k in w:
        assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
    cfg_w = json.loads((tmp_path / "want" / "config.json").read_text())
    cfg_g = json.loads((tmp_path / "got" / "config.json").read_text())
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "per_layer_config", "head_dim"):
        assert cfg_g.get(key) == cfg_w.get(key), key
    assert got.report.as_dict() == want.report.as_dict()
    loaded = pruning.load_pretrained(tmp_path / "got")  # a loadable export
    assert loaded.num_parameters() == pruning.load_pretrained(tmp_path / "want").num_parameters()
    assert len(list((tmp_path / "got").glob("model-*-of-*.safetensors"))) == 4  # a shard per layer, one for the rest


def test_bf16_checkpoint_and_each_layer_leaves_and_returns(tmp_path):
    """A bf16 checkpoint, byte for byte; while any layer runs, it is the only one with its weights in memory (the
    others are on ``meta``), and every layer ran."""
    from pruning.surgery.meta import on_meta

    ckpt = checkpoint(tmp_path, dtype=torch.bfloat16)
    data = calib(n=4, seq=16, seed=2, batch=2)
    want = in_memory(ckpt, tmp_path / "want", data, method="wanda", granularity="mlp_neuron", sparsity=0.5)
    seen: list[tuple[int, list[int]]] = []  # (the layer called, the layers with their weights in memory)
    import pruning.pipeline.frompath as frompath

    real = frompath.build_on_meta

    def spy(config):
        model = real(config)
        layers = model.model.layers
        for j, layer in enumerate(layers):
            layer.register_forward_pre_hook(
                lambda m, a, j=j: seen.append((j, [i for i, x in enumerate(layers) if not on_meta(x)]))
            )
        return model

    frompath.build_on_meta = spy
    try:
        got = pruning.prune(str(ckpt), data, "wanda", 0.5, "mlp_neuron", save_to=tmp_path / "got", progress=False)
    finally:
        frompath.build_on_meta = real
    ran = [(j, live) for j, live in seen if live]  # the first layer's call that captures its inputs runs nothing
    assert {j for j, _ in ran} == {0, 1, 2} and all(live == [j] for j, live in ran)
    assert all(live == [] for j, live in seen if j == 0 and not live)
    w, g = weights(tmp_path / "want"), weights(tmp_path / "got")
    assert all(g[k].dtype == torch.bfloat16 and torch.equal(g[k], w[k]) for k in w if k in g) and set(g) == set(w)
    assert got.report.model.pruned == want.report.model.pruned > 0


def test_tied_embeddings_and_opt(tmp_path):
    for family, kw in (("llama", {"tie_word_embeddings": True}), ("opt", {})):
        ckpt = checkpoint(tmp_path / family, family, **kw)
        data = calib(n=2, seq=16, seed=3, batch=2)
        in_memory(ckpt, tmp_path / family / "want", data, method="wanda", granularity="mlp_neuron", sparsity=0.5)
        pruning.prune(str(ckpt), data, "wanda", 0.5, "mlp_neuron", save_to=tmp_path / family / "got", progress=False)
        w, g = weights(tmp_path / family / "want"), weights(tmp_path / family / "got")
        assert set(g) == set(w) and all(torch.equal(g[k], w[k]) for k in w), family


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="wanda", granularity="unstructured", allocation="global"), "rank scores across layers"),
        (dict(method="magnitude", granularity="layer", sparsity=0.34), "rank scores across layers"),
        (dict(method="taylor", include_embeddings=True), "outside the decoder layers"),
        (dict(method="wanda", sequential=False), "sequential=False"),
        (dict(method="sdm", granularity="expert", family="qwen3_moe"), "per-sequence gradient statistics"),
    ],
)
def test_what_a_streamed_checkpoint_refuses(tmp_path, kw, match):
    ckpt = checkpoint(tmp_path, kw.pop("family", "llama"))
    with pytest.raises(ValueError, match=match):
        pruning.prune(str(ckpt), calib(n=2, seq=8), **kw, save_to=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"save_to= writes a pruned checkpoint streamed from its path"):
        pruning.prune(tiny_model(), calib(n=2, seq=8), save_to=tmp_path / "out", progress=False)


def equal_exports(want: Path, got: Path) -> dict[str, torch.Tensor]:
    w, g = weights(want), weights(got)
    assert set(g) == set(w)
    for k in w:
        assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
    cfg_w, cfg_g = (json.loads((d / "config.json").read_text()) for d in (want, got))
    cfg_w.pop("transformers_version", None), cfg_g.pop("transformers_version", None)
    assert cfg_g == cfg_w
    return g


MOE_CASES = [
    *[(f, dict(method="magnitude", granularity="expert_neuron", sparsity=0.5)) for f in MOE_NAMES],
    *[(f, dict(method="magnitude", granularity="expert", sparsity=0.5)) for f in MOE_NAMES],
    ("mixtral", dict(method="wanda", granularity="unstructured", sparsity=0.5)),
    ("olmoe", dict(method="reap", granularity="expert", sparsity=0.5)),
    ("mixtral", dict(method="frequency", granularity="expert", sparsity=0.5)),
    ("qwen3_moe", dict(method="magnitude", granularity="attention_head", sparsity=0.5)),
    # Taylor on 3-D expert weights: only the sum of the gradients, each layer's .grad read after its walk back
    ("qwen3_moe", dict(method="taylor", granularity="expert", sparsity=0.5)),
    ("mixtral", dict(method="taylor", granularity="expert_neuron", sparsity=0.5)),
]


@pytest.mark.parametrize(
    "family,kw", MOE_CASES, ids=lambda x: x if isinstance(x, str) else f"{x['method']}-{x['granularity']}"
)
def test_moe_checkpoint_one_tensor_per_expert(tmp_path, family, kw):
    """The checkpoint (as ``save_pretrained`` writes it) holds one tensor per expert; pruned from its path, the export
    equals the in-memory one in names, weights and config, and stock ``from_pretrained`` loads it with the logits of
    the in-memory pruned model."""
    from transformers import AutoModelForCausalLM

    ckpt = checkpoint(tmp_path, family)
    assert any(".experts.0." in k for k in weights(ckpt))  # the layout the streamed reader must stack
    data = calib(n=4, seq=16, seed=4, batch=2)
    want, model = in_memory_model(ckpt, tmp_path / "want", data, **kw)
    got = pruning.prune(str(ckpt), data, **kw, save_to=tmp_path / "got", progress=False)
    g = equal_exports(tmp_path / "want", tmp_path / "got")
    assert got.report.as_dict() == want.report.as_dict() and want.report.model.pruned > 0
    if is_per_layer_export(tmp_path / "got"):  # heads cut per layer: the model's own (stacked) names
        assert not any(".experts.0." in k for k in g) and any(k.endswith("experts.down_proj") for k in g)
        loaded = pruning.load_pretrained(tmp_path / "got")
    else:  # stock: one tensor per expert
        assert any(".experts.0." in k for k in g) and not any(k.endswith("experts.down_proj") for k in g)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "got").eval()
    assert loaded.num_parameters() == model.num_parameters()
    if kw["granularity"] != "unstructured":
        assert loaded.num_parameters() < pruning.load_pretrained(ckpt).num_parameters()
    x = data[0]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)


def test_moe_per_layer_export_and_gpt_neox(tmp_path):
    """Different expert counts per layer (``rates``): a per-layer export, written under the model's own (stacked)
    names as the in-memory export is, and loaded by ``load_pretrained``; GPT-NeoX's head, saved as ``embed_out``,
    is found and written back so."""
    ckpt = checkpoint(tmp_path / "moe", "qwen2_moe")
    data = calib(n=4, seq=16, seed=5, batch=2)
    kw = dict(method="magnitude", granularity="expert", sparsity=0.5, allocation="rates", layer_rates=[0.0, 0.25, 0.5])
    _, model = in_memory_model(ckpt, tmp_path / "moe" / "want", data, **kw)
    pruning.prune(str(ckpt), data, **kw, save_to=tmp_path / "moe" / "got", progress=False)
    g = equal_exports(tmp_path / "moe" / "want", tmp_path / "moe" / "got")
    assert "model.layers.2.mlp.experts.down_proj" in g and g["model.layers.2.mlp.experts.down_proj"].shape[0] == 2
    loaded = pruning.load_pretrained(tmp_path / "moe" / "got")
    with torch.no_grad():
        assert torch.equal(loaded(data[0]).logits, model.eval()(data[0]).logits)

    ckpt = checkpoint(tmp_path / "neox", "gpt_neox")
    assert "embed_out.weight" in weights(ckpt)
    kw = dict(method="wanda", granularity="mlp_neuron", sparsity=0.5)
    in_memory(ckpt, tmp_path / "neox" / "want", data, **kw)
    pruning.prune(str(ckpt), data, **kw, save_to=tmp_path / "neox" / "got", progress=False)
    assert "embed_out.weight" in equal_exports(tmp_path / "neox" / "want", tmp_path / "neox" / "got")


def test_moe_checkpoint_read_by_rows_for_meta_init(tmp_path):
    """``meta_init``'s reader (each parameter's rows by name, :func:`~pruning.lightning.meta.materialise_model`, here
    on one process) on a checkpoint with one tensor per expert: the weights stock ``from_pretrained`` loads."""
    from transformers import AutoModelForCausalLM

    from pruning.lightning.meta import materialise_model
    from pruning.surgery.meta import build_on_meta

    ckpt = checkpoint(tmp_path, "mixtral")
    want = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    model = build_on_meta(AutoModelForCausalLM.from_pretrained(ckpt).config)
    materialise_model(model, str(ckpt), None)
    got = model.state_dict()
    assert set(got) == set(want) and "model.layers.0.mlp.experts.gate_up_proj" in got
    assert all(torch.equal(got[k], want[k]) for k in want)
