"""Bad inputs fail early with messages that say what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch
from tiny import calib, tiny_model

import pruning


@pytest.fixture()
def llama():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def data():
    return calib(n=2, seq=8)


@pytest.mark.parametrize("sparsity", [1.2, 1.0, -0.1])
def test_sparsity_out_of_range(llama, sparsity):
    with pytest.raises(ValueError, match=r"sparsity=.* must be in \[0, 1\)"):
        pruning.prune(llama, method="magnitude", sparsity=sparsity, progress=False)


def test_unknown_method_lists_known(llama):
    with pytest.raises(
        ValueError,
        match=r"method='obs' is not a known criterion; choose from \[.*'gblm', "
        r".*'magnitude', .*'sdm', .*'taylor', .*'wanda'\]",
    ):
        pruning.prune(llama, method="obs", progress=False)


def test_unknown_granularity(llama):
    with pytest.raises(ValueError, match=r"granularity='row' is not one of \['unstructured', '2:4'"):
        pruning.prune(llama, method="magnitude", granularity="row", progress=False)


def test_unknown_criterion_option(llama):
    with pytest.raises(ValueError, match=r"gblm: unknown option\(s\) \['beta'\]"):
        pruning.prune(llama, method="gblm", criterion_options={"beta": 1.0}, progress=False)


def test_sdm_unstructured(llama, data):
    with pytest.raises(ValueError, match=r"method='sdm' does not support granularity='unstructured'.*mlp_neuron"):
        pruning.prune(llama, data, method="sdm", granularity="unstructured", progress=False)


def test_sparsity_contradicts_nm(llama, data):
    with pytest.raises(ValueError, match=r"sparsity=0.3 contradicts granularity='2:4'.*sparsity=0.5"):
        pruning.prune(llama, data, method="wanda", sparsity=0.3, granularity="2:4", progress=False)
    with pytest.raises(ValueError, match=r"N:M needs 0 < N < M"):
        pruning.prune(llama, data, method="wanda", sparsity=0.0, granularity="4:4", progress=False)


def test_rates_without_layer_rates(llama):
    with pytest.raises(ValueError, match=r"allocation='rates' needs layer_rates"):
        pruning.prune(llama, method="magnitude", allocation="rates", progress=False)
    with pytest.raises(ValueError, match=r"layer_rates needs 2 values in \[0, 1\)"):
        pruning.prune(llama, method="magnitude", allocation="rates", layer_rates=[0.5], progress=False)


def test_sdm_pure_kl_on_unpruned_model(llama, data):
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    with pytest.raises(ValueError, match=r"alpha=1, temperature=1 on an unpruned model.*identically zero"):
        pruning.prune(llama, data, method="sdm", granularity="mlp_neuron", alpha=1.0, temperature=1.0, progress=False)
    # nothing was changed
    assert all(torch.equal(p, before[n]) for n, p in llama.named_parameters())
    # alpha < 1 is fine
    res = pruning.prune(
        llama, data, method="sdm", granularity="mlp_neuron", alpha=0.5, temperature=1.0, sparsity=0.25, progress=False
    )
    assert res.info["kept_groups_per_layer"] == {0: 48, 1: 48}


@pytest.mark.parametrize(
    "method,granularity",
    [("taylor", "unstructured"), ("gblm", "unstructured"), ("sdm", "mlp_neuron"), ("wanda", "unstructured")],
)
def test_calibration_required(llama, method, granularity):
    with pytest.raises(ValueError, match=rf"method='{method}' needs calibration data"):
        pruning.prune(llama, method=method, granularity=granularity, progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        pruning.prune(llama, [], method=method, granularity=granularity, progress=False)


def test_calibration_must_be_token_ids(llama):
    with pytest.raises(TypeError, match="token ids"):
        pruning.prune(llama, [torch.rand(2, 8)], method="wanda", progress=False)


def test_alpha_only_for_sdm(llama, data):
    with pytest.raises(ValueError, match=r"alpha=0.5 is the distillation weight of method='sdm'"):
        pruning.prune(llama, data, method="taylor", alpha=0.5, progress=False)


def test_query_head_on_mha_opt():
    with pytest.raises(ValueError, match=r"granularity='query_head' needs grouped-query attention.*attention_head"):
        pruning.prune(tiny_model("opt", layers=1), method="magnitude", granularity="query_head", progress=False)


def test_layer_granularity_on_post_norm_opt():
    model = tiny_model("opt", layers=2, do_layer_norm_before=False)
    with pytest.raises(ValueError, match=r"granularity='layer' needs pre-norm.*do_layer_norm_before=False"):
        pruning.prune(model, method="magnitude", granularity="layer", progress=False)
    # the pre-norm OPT is accepted and drops one of its two layers
    res = pruning.prune(tiny_model("opt", layers=2), method="magnitude", granularity="layer", progress=False)
    assert sorted(res.info["kept_groups_per_layer"].values()) == [0, 1]


def test_unsupported_model_via_prune():
    model = tiny_model("gpt2", layers=1, attn=None, vocab_size=64, max_position_embeddings=1024)
    with pytest.raises(pruning.UnsupportedModelError, match=r"model_type='gpt2'.*register_family"):
        pruning.prune(model, method="magnitude", progress=False)


def test_gblm_bad_options():
    with pytest.raises(ValueError, match="gradient_norm='l3' must be 'l2' or 'l1'"):
        pruning.get_criterion("gblm", gradient_norm="l3")
    with pytest.raises(ValueError, match="taylor mode='row'"):
        pruning.get_criterion("taylor", mode="row")
