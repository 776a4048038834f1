"""Gradient statistics one decoder layer at a time (``pruning.pipeline.streamed``) equal those of the whole-model
backward, for every gradient criterion (Taylor, GBLM, SDMPrune's two stages, SAAP), gated and non-gated families,
the fallbacks (embeddings, a tied head) included; layers really leave for the device and come back."""

from __future__ import annotations

import pytest
import torch
from test_sequences import NO_DROPOUT, assert_same
from tiny import calib, tiny_model

import pruning
from pruning.options import PruneOptions
from pruning.pipeline import Pruner, collect_gradients
from pruning.pipeline.streamed import collect_gradients_layerwise
from pruning.stats import GradientCollector
from pruning.structure import ModelStructure


def model_of(family: str = "llama", layers: int = 3, **kw):
    return tiny_model(family, layers=layers, seed=0, **(NO_DROPOUT if family == "opt" else {}), **kw)


def both(model, collector_of, **kw) -> tuple[dict, dict]:
    """The statistics of the whole-model backward and of the layer-wise one, same data."""
    data = calib(n=6, seq=12, seed=3, batch=3)
    want, got = collector_of(), collector_of()
    collect_gradients(model, data, want, progress=False, **kw)
    collect_gradients_layerwise(model, data, got, **kw)
    assert all(p.grad is None for p in model.parameters())
    return got.state_dict(), want.state_dict()


CRITERIA = [
    ("llama", "taylor", "unstructured", {}),
    ("llama", "taylor", "mlp_neuron", {"criterion_options": {"mode": "vector"}}),
    ("llama", "gblm", "unstructured", {}),
    ("llama", "sdm", "mlp_neuron", {}),
    ("llama", "sdm", "attention_head", {}),
    ("llama", "saap", "mlp_neuron", {}),
    ("llama", "saap", "mlp_neuron+attention_head", {"criterion_options": {"second_order": True}}),
    ("opt", "gblm", "unstructured", {}),
    ("opt", "sdm", "mlp_neuron", {}),
    ("opt", "saap", "attention_head", {}),
]


@pytest.mark.parametrize("family,method,granularity,extra", CRITERIA)
def test_layerwise_statistics_equal_the_whole_model_backward(family, method, granularity, extra):
    model = model_of(family)
    pruner = Pruner(model, PruneOptions(method=method, granularity=granularity, sparsity=0.25, **extra))
    got, want = both(model, pruner.gradient_collector)
    assert got and all(v["count"] == 6 for v in want.values())
    assert_same(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["expert", "expert_neuron"])
def test_taylor_on_3d_experts_reads_each_layer_per_calibration_tensor(granularity, dtype):
    """Taylor on stacked 3-D expert weights (not Linears: only the summed gradient, read from ``.grad``): each layer's
    gradient is read into the fp32 sums after every calibration tensor's backward through it, as the whole-model
    pass reads it after every backward, so the counts match and bf16 gradients are not summed in bf16 first."""
    model = tiny_model("qwen3_moe", layers=2, seed=0).to(dtype)
    pruner = Pruner(model, PruneOptions(method="taylor", granularity=granularity, sparsity=0.5))
    got, want = both(model, pruner.gradient_collector)
    assert any("experts" in k for k in want) and all(v["count"] == 6 for v in want.values())
    assert {k: v["count"] for k, v in got.items()} == {k: v["count"] for k, v in want.items()}
    for k, v in want.items():
        torch.testing.assert_close(got[k]["sums"]["sum"], v["sums"]["sum"], rtol=0, atol=0, msg=k)


def test_sdm_second_stage_distils_from_the_lifted_streamed_weights():
    """SDMPrune's stage 2: KL + CE against the teacher that is the same weights with the masks lifted (streamed
    twice: the teacher's sweep lifts them); the first stage pruned with keep_original."""
    model = model_of("llama")
    data = calib(n=4, seq=12, seed=1, batch=2)
    first = pruning.prune(model, data, "sdm", 0.25, "mlp_neuron", keep_original=True, progress=False)
    pruner = Pruner(model, PruneOptions(method="sdm", granularity="mlp_neuron", sparsity=0.5, alpha=0.5))
    kw = dict(alpha=0.5, temperature=2.0, masks=first.masks)
    got, want = both(model, pruner.gradient_collector, **kw)
    assert_same(got, want)
    # the teacher matters: without the lifted weights (student as teacher) the statistics differ
    plain, _ = both(model, pruner.gradient_collector, alpha=0.5, temperature=2.0)
    key = next(iter(want))
    assert not torch.allclose(plain[key]["sums"]["coupled"], want[key]["sums"]["coupled"])


def test_a_separate_teacher_and_all_kl_positions():
    model, teacher = model_of("llama"), model_of("llama")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    name = "model.layers.2.mlp.down_proj.weight"
    kw = dict(alpha=0.6, temperature=0.5, kl_positions="all", teacher=teacher)
    got, want = both(model, lambda: GradientCollector(model, [name], ("sum_sq",)), **kw)
    assert_same(got, want)


@pytest.mark.parametrize("kinds", [("sum_sq",), ("sum",)])
def test_embeddings_and_a_tied_head_are_read_from_grad(kinds):
    """Parameters a batched backward cannot serve: per sequence (``sum`` alone: per calibration tensor), ``.grad``
    adding up the head's and the embeddings' parts of a tied weight as one backward does."""
    model = model_of("llama", tie_word_embeddings=True)
    names = [n + ".weight" for n in ModelStructure(model).targets(include_embeddings=True, include_lm_head=True)]
    got, want = both(model, lambda: GradientCollector(model, names, kinds))
    assert "model.embed_tokens.weight" in want
    assert_same(got, want)


def test_batched_false_is_one_pass_per_sequence():
    model = model_of("opt")
    names = [n + ".weight" for n in ModelStructure(model).targets()]
    got, want = both(model, lambda: GradientCollector(model, names, ("sum_sq", "sum_abs")), batched=False)
    assert_same(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type (CUDA)")
@pytest.mark.parametrize("method,granularity", [("taylor", "unstructured"), ("sdm", "mlp_neuron")])
def test_prune_on_another_device_streams_the_layers(method, granularity):
    """The model on the host, ``device='cuda'``: the layers visit the GPU one at a time, forward and backward, and
    the masks are those of the whole model on the host (scores equal to fp32 rounding: tolerance of a few flips)."""
    data = calib(n=4, seq=12, seed=2, batch=2)
    host, moved = model_of("llama"), model_of("llama")
    want = pruning.prune(host, data, method, 0.5, granularity, progress=False)
    got = pruning.prune(moved, data, method, 0.5, granularity, device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in moved.parameters())
    for name in want.masks.names():
        w, g = (
            want.masks.keep_mask(name, host.get_parameter(name)),
            got.masks.keep_mask(name, moved.get_parameter(name)),
        )
        assert (w != g).float().mean() < 0.02, name
