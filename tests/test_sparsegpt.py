"""SparseGPT: hand-computed OBS updates, reconstruction error against Wanda, N:M validity, the Cholesky retry, and
the integration into ``pruning.prune`` (layer-sequential, from collected statistics, OWL)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import calib, tiny_model

import pruning
from pruning import allocation as alloc
from pruning.importance import CRITERIA, ScoreContext, get_criterion
from pruning.importance.sparsegpt import inverse_cholesky, sparsegpt_prune
from pruning.stats import ActivationCollector, ActivationStats
from pruning.structure import ModelStructure

T = torch.tensor


# ------------------------------------------------------------------------------------------ the algorithm, by hand
def test_identity_hessian_is_magnitude_without_update():
    """Uncorrelated unit inputs: OBS saliency is w², and pruning a weight moves no other one. Saliencies
    [[1,16,9,4],[.25,.01,.04,81]] at 50 %: per row, the two lowest of each row; by default (the paper's selection:
    one threshold over the block's rows × columns) the four lowest of the block, 1 from row 0 and 3 from row 1."""
    W = T([[1.0, -4.0, 3.0, 2.0], [0.5, 0.1, -0.2, 9.0]])
    keep, W_new, info = sparsegpt_prune(W, torch.eye(4), 0.5, percdamp=0.0, scope="row")
    assert keep.tolist() == [[False, True, True, False], [True, False, False, True]]
    torch.testing.assert_close(W_new, W * keep)
    assert info["retries"] == 0
    keep, W_new, _ = sparsegpt_prune(W, torch.eye(4), 0.5, percdamp=0.0)
    assert keep.tolist() == [[False, True, True, True], [False, False, False, True]]
    torch.testing.assert_close(W_new, W * keep)
    assert torch.equal(keep, sparsegpt_prune(W, torch.eye(4), 0.5, percdamp=0.0, scope="layer")[0])


def test_block_wide_selection_is_chosen_per_column_block():
    """Blocks of 2 columns, 50 %: the threshold is taken over each block's rows × columns, so every block loses
    exactly half of its weights while rows differ. Saliencies (identity H) [[1,16 | 9,4],[.25,.01 | .04,81]]:
    block 1 loses .01 and .25 (row 1), block 2 loses .04 (row 1) and 4 (row 0)."""
    W = T([[1.0, -4.0, 3.0, 2.0], [0.5, 0.1, -0.2, 9.0]])
    keep, _, _ = sparsegpt_prune(W, torch.eye(4), 0.5, percdamp=0.0, blocksize=2)
    assert keep.tolist() == [[True, True, True, False], [False, False, False, True]]


def test_one_pruned_weight_moves_its_neighbour_by_the_obs_formula():
    """W=[[1,2]], H=[[2,1],[1,2]], H⁻¹=[[2,-1],[-1,2]]/3. Saliencies w²/[H⁻¹]_jj at elimination: 1/(2/3)=1.5 and
    4/(1/2)=8 → w₀ goes; δw₁ = −w₀·[H⁻¹]₀₁/[H⁻¹]₀₀ = +0.5 → [[0, 2.5]]; loss = w₀²/(2[H⁻¹]₀₀) = 0.75 = ½δwHδwᵀ."""
    W = T([[1.0, 2.0]])
    H = T([[2.0, 1.0], [1.0, 2.0]])
    keep, W_new, info = sparsegpt_prune(W, H, 0.5, percdamp=0.0)
    assert keep.tolist() == [[False, True]]
    torch.testing.assert_close(W_new, T([[0.0, 2.5]]))
    assert info["loss"] == pytest.approx(0.75, rel=1e-5)
    dw = W_new - W
    assert float(dw @ H @ dw.T) / 2 == pytest.approx(0.75, rel=1e-5)


def test_lazy_block_updates_equal_one_block():
    """N:M selection happens every M columns on the updated weights, so the block size only changes how updates
    are batched: blocks of 4 and of 64 give the same masks and weights."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    W = torch.randn(16, 64, generator=g)
    H = 2 * X.T @ X
    k4, w4, _ = sparsegpt_prune(W, H, nm=(2, 4), blocksize=4)
    k64, w64, _ = sparsegpt_prune(W, H, nm=(2, 4), blocksize=64)
    assert torch.equal(k4, k64)
    torch.testing.assert_close(w4, w64, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- reconstruction against Wanda
def _inputs(seed: int, tokens: int = 512, d: int = 64) -> torch.Tensor:
    """Correlated features with a few large-magnitude columns, like LLM hidden states; one fixed distribution
    (mixing matrix and outlier columns), ``seed`` draws the tokens."""
    g = torch.Generator().manual_seed(123)
    mix = torch.eye(d) + torch.randn(d, d, generator=g) / math.sqrt(d)
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=g)[:4]] = 8.0
    return (torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed)) @ mix) * scale


def _trained_weight(X: torch.Tensor, out: int = 32, steps: int = 300) -> torch.Tensor:
    """A Linear fitted by AdamW to a low-rank teacher plus noise: weights with the structure training leaves."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(X.shape[1], 4, generator=g) @ torch.randn(4, out, generator=g) / X.shape[1]
    Y = X @ teacher + 0.05 * torch.randn(X.shape[0], out, generator=g)
    lin = torch.nn.Linear(X.shape[1], out, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02, generator=g)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        ((lin(X) - Y) ** 2).mean().backward()
        opt.step()
    return lin.weight.detach().clone()


def _wanda(W: torch.Tensor, X: torch.Tensor, granularity: str) -> torch.Tensor:
    scores = W.abs() * X.norm(dim=0)[None, :]
    if granularity == "unstructured":
        return W * alloc.select_unstructured(scores, 0.5, "row")
    n, m = (int(x) for x in granularity.split(":"))
    return W * alloc.select_nm(scores, n, m)


@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("weights", ["random", "trained"])
@pytest.mark.parametrize("granularity", ["unstructured", "2:4", "4:8"])
def test_reconstruction_error_below_wanda(weights, granularity, scope):
    """‖WX − ŴX‖ on the calibration inputs and on held-out inputs of the same distribution."""
    X, X_test = _inputs(0), _inputs(5)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) if weights == "random" else _trained_weight(X)
    nm = None if granularity == "unstructured" else tuple(int(x) for x in granularity.split(":"))
    keep, W_sgpt, _ = sparsegpt_prune(W, 2 * X.T @ X, None if nm else 0.5, nm, scope=scope)
    W_wanda = _wanda(W, X, granularity)
    assert torch.equal(W_sgpt == 0, ~keep | (W == 0))
    assert (W_sgpt == 0).sum() == (W_wanda == 0).sum() == W.numel() // 2
    for inputs in (X, X_test):
        err_sgpt = (inputs @ (W - W_sgpt).T).norm()
        err_wanda = (inputs @ (W - W_wanda).T).norm()
        assert err_sgpt < 0.95 * err_wanda, (float(err_sgpt), float(err_wanda))


# ------------------------------------------------------------------------------------------------ masks and counts
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_valid_and_pruned_weights_exactly_zero(nm):
    n, m = nm
    X = _inputs(3)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    keep, W_new, _ = sparsegpt_prune(W, X.T @ X, nm=nm)
    assert (keep.view(24, 64 // m, m).sum(-1) == n).all()
    assert ((W_new != 0).view(24, 64 // m, m).sum(-1) <= n).all()
    assert (W_new[~keep] == 0).all()
    with pytest.raises(ValueError, match="divisible by 8"):
        sparsegpt_prune(torch.randn(4, 12), torch.eye(12), nm=(4, 8))


def test_unstructured_exact_counts_row_and_layer():
    """Shares per column block are rounded cumulatively: per row each row loses exactly floor(p·in) in all, block-wide
    (the default) the layer loses exactly floor(p·out·in)."""
    X = _inputs(6, d=100)
    W = torch.randn(7, 100, generator=torch.Generator().manual_seed(7))
    keep, _, _ = sparsegpt_prune(W, X.T @ X, 0.3, blocksize=32, scope="row")
    assert (keep.sum(1) == 100 - 30).all()
    keep, _, _ = sparsegpt_prune(W, X.T @ X, 0.3, blocksize=32, scope="layer")
    assert int((~keep).sum()) == math.floor(0.3 * 700)
    assert len(set(keep.sum(1).tolist())) > 1  # adaptive: rows keep different counts
    assert torch.equal(keep, sparsegpt_prune(W, X.T @ X, 0.3, blocksize=32)[0])


def test_previous_mask_is_kept_and_dead_inputs_go_first():
    X = _inputs(8, d=32)
    X[:, 5] = 0.0  # an input that never fires: free to prune, and H stays invertible
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(9))
    H = X.T @ X
    for scope in ("row", "layer"):
        keep1, W1, _ = sparsegpt_prune(W, H, 0.25, scope=scope)
        assert not keep1[:, 5].any()
        keep2, W2, _ = sparsegpt_prune(W1, H, 0.5, prev_keep=keep1, scope=scope)
        assert not (keep2 & ~keep1).any() and torch.isfinite(W2).all()
        if scope == "row":
            assert (keep2.sum(1) == 16).all()
        else:
            assert int(keep2.sum()) == 6 * 16


# ------------------------------------------------------------------------------------------- damping and retries
def test_singular_hessian_without_damping_is_retried():
    """A duplicated input makes H exactly singular: with percdamp=0 the factorisation fails and is retried at 1 %."""
    X = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    X = torch.cat([X, X[:, :1]], dim=1)
    H = X.T @ X
    assert torch.linalg.cholesky_ex(H)[1] > 0
    keep, W_new, info = sparsegpt_prune(torch.randn(2, 4), H, 0.5, percdamp=0.0, scope="row")
    assert info["retries"] == 1 and info["percdamp"] == 0.01
    assert torch.isfinite(W_new).all() and (keep.sum(1) == 2).all()


def test_indefinite_hessian_raises_damping_tenfold():
    """Rounding can leave H slightly indefinite; 1 % of the mean diagonal is not enough here, 10 % is."""
    H = torch.diag(T([1.0, 1.0, 1.0, -0.05]))
    U, info = inverse_cholesky(H, 0.01)
    assert info["retries"] == 1 and info["percdamp"] == pytest.approx(0.1)
    Hd = H + info["damp"] * torch.eye(4)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd))


def test_hopeless_hessian_fails_with_a_hint():
    with pytest.raises(RuntimeError, match="Cholesky.*HINT"):
        inverse_cholesky(torch.full((3, 3), float("nan")), 0.01, max_retries=2)


# --------------------------------------------------------------------------------------------- the criterion
def test_registered_with_options_and_refuses_structured():
    assert "sparsegpt" in CRITERIA
    crit = get_criterion("sparsegpt", blocksize=64, percdamp=0.05)
    assert crit.reconstructs and "gram" in crit.collector_options()["kinds"]
    for g in ("unstructured", "2:4", "4:8"):
        crit.check_granularity(g)
    with pytest.raises(ValueError, match="sparsegpt.*granularity='mlp_neuron' is not supported.*HINT"):
        crit.check_granularity("mlp_neuron")
    with pytest.raises(ValueError, match="percdamp"):
        get_criterion("sparsegpt", percdamp=-1.0)


def test_element_scores_are_wanda_and_missing_gram_is_explained():
    w = T([[1.0, 2.0, 3.0, 4.0]])
    s = ActivationStats()
    s.update(T([[10.0, 1.0, 1.0, 0.1]]))
    ctx = ScoreContext(weights={"l.weight": w}, act={"l": s})
    crit = get_criterion("sparsegpt")
    torch.testing.assert_close(crit.element_scores("l.weight", ctx), T([[10.0, 2.0, 3.0, 0.4]]))
    with pytest.raises(KeyError, match="Gram matrix"):
        crit.prune_weight("l.weight", ctx, 0.5, None, "row", None)


def test_default_scope_is_the_criterions_own():
    """SparseGPT selects block-wide by default (scope 'layer'); Wanda and magnitude per row; a scope given wins."""
    from pruning.options import SelectionOptions

    assert CRITERIA["sparsegpt"].default_scope == "layer"
    assert SelectionOptions(method="sparsegpt").comparison_scope == "layer"
    assert SelectionOptions(method="sparsegpt", granularity="2:4").comparison_scope == "layer"
    assert SelectionOptions(method="sparsegpt", scope="row").comparison_scope == "row"
    for method in ("wanda", "magnitude", "gblm"):
        assert SelectionOptions(method=method).comparison_scope == "row"
    assert SelectionOptions(method="wanda", granularity="mlp_neuron").comparison_scope is None
    assert SelectionOptions(method="sparsegpt").record()["scope"] == "layer"


# ---------------------------------------------------------------------------------------- through pruning.prune
@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", layers=2, seed=1)
    batches = calib(n=8, seq=32, seed=3)
    ids = torch.cat(batches)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    return model, batches, ids, ref


@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_prune_sequential_reconstructs_and_masks_hold(tiny, granularity):
    model, batches, ids, ref = tiny
    errors = {}
    for method in ("wanda", "sparsegpt"):
        m = copy.deepcopy(model)
        res = pruning.prune(m, batches, method=method, sparsity=0.5, granularity=granularity, progress=False)
        assert res.report.targeted.fraction == pytest.approx(0.5)
        for name, keep in res.masks.element.items():
            assert (m.get_parameter(name)[~keep] == 0).all(), name
        with torch.no_grad():
            errors[method] = float((m(input_ids=ids).logits - ref).square().mean())
        if method == "sparsegpt":
            orig = dict(model.named_parameters())
            name, keep = next(iter(res.masks.element.items()))
            assert not torch.allclose(m.get_parameter(name)[keep], orig[name][keep])  # kept weights were updated
            assert set(res.info["diagnostics"]) == set(res.masks.element)
            assert all(d["retries"] == 0 for d in res.info["diagnostics"].values())
            res.masks.attach(m)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            assert all((m.get_parameter(n)[~k] == 0).all() for n, k in res.masks.element.items())
            res.masks.detach()
    assert errors["sparsegpt"] < errors["wanda"], errors


def test_prune_default_is_block_wide_and_per_row_an_option(tiny):
    """pruning.prune with sparsegpt: the default equals scope='layer' (rows lose different counts, each weight
    exactly half), scope='row' gives every row the same count."""
    model, batches, *_ = tiny
    masks = {}
    for scope in (None, "layer", "row"):
        m = copy.deepcopy(model)
        res = pruning.prune(m, batches, method="sparsegpt", sparsity=0.5, scope=scope, progress=False)
        assert res.info["scope"] == (scope or "layer")
        masks[scope] = res.masks.element
    assert masks[None].keys() == masks["layer"].keys() == masks["row"].keys()
    assert all(torch.equal(masks[None][n], masks["layer"][n]) for n in masks[None])
    for name, keep in masks["row"].items():
        assert len(set(keep.sum(1).tolist())) == 1, name
        assert int((~masks[None][name]).sum()) == keep.numel() // 2, name
    assert any(len(set(k.sum(1).tolist())) > 1 for k in masks[None].values())


def test_prune_from_collected_statistics(tiny):
    """The callback path: Gram matrices gathered by an ActivationCollector built from the criterion's options."""
    model, batches, ids, ref = tiny
    m = copy.deepcopy(model)
    s = ModelStructure(m)
    crit = get_criterion("sparsegpt")
    coll = ActivationCollector(s.targets(), **crit.collector_options()).attach()
    with torch.no_grad():
        for b in batches:
            m(input_ids=b)
    coll.detach()
    state = coll.state_dict()  # checkpointable like every statistic
    assert state[next(iter(state))]["sums"]["gram"].shape == (32, 32)
    res = pruning.prune(m, None, method="sparsegpt", sparsity=0.5, activations=coll, sequential=False, progress=False)
    assert res.report.targeted.fraction == pytest.approx(0.5)
    plain = ActivationCollector(s.targets())
    with pytest.raises(KeyError, match="Gram matrix"):
        pruning.prune(copy.deepcopy(model), None, method="sparsegpt", activations=plain, sequential=False)


def test_prune_refusals(tiny):
    model, batches, *_ = tiny
    with pytest.raises(ValueError, match="sparsegpt.*not supported"):
        pruning.prune(copy.deepcopy(model), batches, method="sparsegpt", sparsity=0.3, granularity="mlp_neuron")
    with pytest.raises(ValueError, match="no global ranking"):
        pruning.prune(copy.deepcopy(model), batches, method="sparsegpt", allocation="global")
    with pytest.raises(ValueError, match="keep_original"):
        pruning.prune(copy.deepcopy(model), batches, method="sparsegpt", keep_original=True)


# ------------------------------------------------------------------------------------ OWL with every activation method
@pytest.mark.parametrize("method", ["wanda", "gblm", "sparsegpt"])
def test_owl_rates_nonuniform_with_target_mean(method):
    model = tiny_model("llama", layers=3, seed=2)
    batches = calib(n=4, seq=32, seed=4)
    res = pruning.prune(model, batches, method=method, sparsity=0.5, allocation="owl", owl_m=2.0, progress=False)
    rates = res.info["layer_rates"]
    assert len(set(round(r, 6) for r in rates)) == 3 and max(rates) - min(rates) == pytest.approx(0.16)
    assert sum(rates) / 3 == pytest.approx(0.5)
    # each layer pruned at its own rate (per row: floor(rate · in) of every row)
    fractions = [res.report.layers[i].fraction for i in range(3)]
    assert sorted(range(3), key=lambda i: fractions[i]) == sorted(range(3), key=lambda i: rates[i])
    assert sum(fractions) / 3 == pytest.approx(0.5, abs=0.03)
