"""Criteria and selection on named tiny layers with hand-computed answers.

Statistics are faked (``.sums[...]`` filled by hand) so that every expectation below can be checked on paper.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from pruning import allocation as alloc
from pruning.importance import ScoreContext, get_criterion
from pruning.masks import MaskSet, nm_mask
from pruning.stats import ActivationStats, GradientStats, GroupGradientStats
from pruning.structure import GroupSet, Member, ModelStructure

T = torch.tensor


def act(sum_sq) -> ActivationStats:
    s = ActivationStats()
    s.sums["sum_sq"] = torch.as_tensor(sum_sq, dtype=torch.float32)
    s.count = 1
    return s


def grad(**sums) -> GradientStats:
    s = GradientStats(tuple(sums))
    for k, v in sums.items():
        s.sums[k] = torch.as_tensor(v, dtype=torch.float32)
    s.count = 1
    return s


def keep_of(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- the named examples
def test_wanda_style_example_keeps_first_two():
    """STYLE.md item 12: W=[[1,2,3,4]], ‖X‖=[100,10,1,0.1], 50 % per row -> [[1,2,0,0]]."""
    w = T([[1.0, 2.0, 3.0, 4.0]])
    ctx = ScoreContext(weights={"l.weight": w}, act={"l": act(T([100.0, 10.0, 1.0, 0.1]) ** 2)})
    scores = get_criterion("wanda").element_scores("l.weight", ctx)
    torch.testing.assert_close(scores, T([[100.0, 20.0, 3.0, 0.4]]))
    keep = alloc.select_unstructured(scores, 0.5, "row")
    assert keep.tolist() == [[True, True, False, False]]
    assert (w * keep).tolist() == [[1.0, 2.0, 0.0, 0.0]]


def test_magnitude_example_keeps_last_two():
    w = T([[1.0, 2.0, 3.0, 4.0]])
    ctx = ScoreContext(weights={"l.weight": w})
    keep = alloc.select_unstructured(get_criterion("magnitude").element_scores("l.weight", ctx), 0.5, "row")
    assert keep.tolist() == [[False, False, True, True]]


def test_gblm_l2_hand_computed():
    # |W| * ||X|| = [1,2,3,4]; G = sqrt([100,0,0,0]) = [10,0,0,0]; alpha=1 -> [11,2,3,4]
    w = T([[1.0, -2.0, 3.0, -4.0]])
    ctx = ScoreContext(
        weights={"l.weight": w},
        act={"l": act([1.0, 1.0, 1.0, 1.0])},
        grad={"l.weight": grad(sum_sq=[[100.0, 0.0, 0.0, 0.0]])},
    )
    crit = get_criterion("gblm", alpha=1.0, gradient_norm="l2")
    assert crit.grad_kinds == ("sum_sq",)
    scores = crit.element_scores("l.weight", ctx)
    torch.testing.assert_close(scores, T([[11.0, 2.0, 3.0, 4.0]]))
    assert alloc.select_unstructured(scores, 0.5).tolist() == [[True, False, False, True]]
    # alpha = 0 is plain Wanda
    s0 = get_criterion("gblm", alpha=0.0).element_scores("l.weight", ctx)
    assert alloc.select_unstructured(s0, 0.5).tolist() == [[False, False, True, True]]


def test_gblm_l1_hand_computed():
    # G = sum_abs = [0,5,0,0]; alpha=2 -> [1, 2 + 2*2*5, 3, 4] = [1,22,3,4]
    w = T([[1.0, 2.0, 3.0, 4.0]])
    ctx = ScoreContext(
        weights={"l.weight": w},
        act={"l": act([1.0, 1.0, 1.0, 1.0])},
        grad={"l.weight": grad(sum_abs=[[0.0, 5.0, 0.0, 0.0]])},
    )
    crit = get_criterion("gblm", alpha=2.0, gradient_norm="l1")
    assert crit.grad_kinds == ("sum_abs",)
    scores = crit.element_scores("l.weight", ctx)
    torch.testing.assert_close(scores, T([[1.0, 22.0, 3.0, 4.0]]))
    assert alloc.select_unstructured(scores, 0.5).tolist() == [[False, True, False, True]]


def _two_member_groupset() -> tuple[GroupSet, dict, dict]:
    """Two groups: row g of a.weight [2,3] and column g of b.weight [3,2]."""
    gs = GroupSet("mlp_neuron", 0, 2, (Member("a.weight", 0, 1), Member("b.weight", 1, 1)), numels=(6, 6))
    weights = {"a.weight": T([[1.0, -1.0, 2.0], [1.0, 1.0, 1.0]]), "b.weight": torch.ones(3, 2)}
    # G*W of a: [[5,-5,0],[1,1,1]];  G*W of b: [[1,0],[1,0],[-1,1]]
    grads = {
        "a.weight": grad(sum=[[5.0, 5.0, 0.0], [1.0, 1.0, 1.0]]),
        "b.weight": grad(sum=[[1.0, 0.0], [1.0, 0.0], [-1.0, 1.0]]),
    }
    return gs, weights, grads


def test_taylor_element_and_vector_on_groupset():
    gs, weights, grads = _two_member_groupset()
    ctx = ScoreContext(weights=weights, grad=grads)
    elem = get_criterion("taylor", mode="element")
    torch.testing.assert_close(elem.element_scores("a.weight", ctx), T([[5.0, 5.0, 0.0], [1.0, 1.0, 1.0]]))
    # element: sum |G.W| -> group0 = 10 + 3, group1 = 3 + 1
    torch.testing.assert_close(elem.group_scores(gs, ctx), T([13.0, 4.0]))
    # vector: |sum G.W| -> group0 = |0 + 1| = 1, group1 = |3 + 1| = 4
    vec = get_criterion("taylor", mode="vector")
    torch.testing.assert_close(vec.group_scores(gs, ctx), T([1.0, 4.0]))
    assert alloc.topk_keep(elem.group_scores(gs, ctx), 1).tolist() == [True, False]
    assert alloc.topk_keep(vec.group_scores(gs, ctx), 1).tolist() == [False, True]


# ---------------------------------------------------------------- structured forms: Wanda-sp / sum, magnitude L2 / L1
def _named_mlp(gate, up, down) -> tuple[GroupSet, dict]:
    """Two MLP neurons over a hidden size of 2: row i of gate and up, column i of down (as ModelStructure builds)."""
    members = (Member("gate.weight", 0, 1), Member("up.weight", 0, 1), Member("down.weight", 1, 1))
    weights = {"gate.weight": T(gate), "up.weight": T(up), "down.weight": T(down)}
    return GroupSet("mlp_neuron", 0, 2, members, numels=(4, 4, 4)), weights


def test_wanda_structured_sp_default_and_sum_hand_computed():
    """‖x‖ of the MLP input = [1, 1] (gate, up); ‖x‖ of down_proj's input (the neurons' activations) = [1, 3].
    gate = [[4,4],[1,1]], up = [[2,-2],[1,1]], down = [[1,1],[-1,1]] (column i = neuron i).
    Wanda-sp: Σ_j |W_down[j,i]|·‖x_i‖ -> neuron 0: (1+1)·1 = 2, neuron 1: (1+1)·3 = 6 -> neuron 1 kept.
    sum: gate row + up row + down column -> neuron 0: 8 + 4 + 2 = 14, neuron 1: 2 + 2 + 6 = 10 -> neuron 0 kept."""
    gs, weights = _named_mlp([[4.0, 4.0], [1.0, 1.0]], [[2.0, -2.0], [1.0, 1.0]], [[1.0, 1.0], [-1.0, 1.0]])
    ctx = ScoreContext(weights=weights, act={"gate": act([1.0, 1.0]), "up": act([1.0, 1.0]), "down": act([1.0, 9.0])})
    sp = get_criterion("wanda").group_scores(gs, ctx)
    torch.testing.assert_close(sp, T([2.0, 6.0]))
    torch.testing.assert_close(get_criterion("wanda", structured="sp").group_scores(gs, ctx), sp)
    summed = get_criterion("wanda", structured="sum").group_scores(gs, ctx)
    torch.testing.assert_close(summed, T([14.0, 10.0]))
    assert alloc.topk_keep(sp, 1).tolist() == [False, True]
    assert alloc.topk_keep(summed, 1).tolist() == [True, False]
    with pytest.raises(ValueError, match="structured='max' must be 'sp'.*or 'sum'"):
        get_criterion("wanda", structured="max")


def test_magnitude_structured_l2_default_and_l1_hand_computed():
    """gate = [[3,0],[1,1]], up = [[0,0],[1,1]], down = [[0,1],[0,-1]].
    L2: neuron 0: sqrt(9) = 3, neuron 1: sqrt(1+1+1+1+1+1) = sqrt(6) ≈ 2.449 -> neuron 0 kept.
    L1: neuron 0: 3, neuron 1: 2 + 2 + 2 = 6 -> neuron 1 kept."""
    gs, weights = _named_mlp([[3.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, -1.0]])
    ctx = ScoreContext(weights=weights)
    l2 = get_criterion("magnitude").group_scores(gs, ctx)
    torch.testing.assert_close(l2, T([3.0, 6.0**0.5]))
    torch.testing.assert_close(get_criterion("magnitude", norm="l2").group_scores(gs, ctx), l2)
    l1 = get_criterion("magnitude", norm="l1").group_scores(gs, ctx)
    torch.testing.assert_close(l1, T([3.0, 6.0]))
    assert alloc.topk_keep(l2, 1).tolist() == [True, False]
    assert alloc.topk_keep(l1, 1).tolist() == [False, True]
    # elements are |W| whatever the norm
    for norm in ("l2", "l1"):
        torch.testing.assert_close(
            get_criterion("magnitude", norm=norm).element_scores("up.weight", ctx), weights["up.weight"].abs()
        )
    with pytest.raises(ValueError, match="norm='l3' must be 'l2'.*or 'l1'"):
        get_criterion("magnitude", norm="l3")


def _named_heads() -> tuple[GroupSet, ScoreContext]:
    """Two query heads of head_dim 2 over a hidden size of 2: q rows 2h, 2h+1 and o columns 2h, 2h+1."""
    gs = GroupSet("query_head", 0, 2, (Member("q.weight", 0, 2), Member("o.weight", 1, 2)), numels=(8, 8))
    weights = {
        "q.weight": T([[2.0, 0.0], [0.0, 2.0], [1.0, 2.0], [1.0, -2.0]]),
        "o.weight": T([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, -1.0, 1.0]]),
    }
    return gs, ScoreContext(weights=weights, act={"q": act([1.0, 16.0]), "o": act([25.0, 1.0, 1.0, 1.0])})


def test_heads_wanda_sp_on_o_columns_and_l2_per_head_hand_computed():
    """q = [[2,0],[0,2] | [1,2],[1,-2]], o = [[1,0 | 1,1],[0,1 | -1,1]]; ‖x‖ of q's input [1,4], of o's [5,1,1,1].
    Wanda-sp (o columns only): head 0 = (1+0)·5 + (0+1)·1 = 6, head 1 = (1+1)·1 + (1+1)·1 = 4 -> head 0 kept.
    sum: q rows of head 0 = 2 + 8 = 10, of head 1 = (1+8) + (1+8) = 18 -> head 0: 16, head 1: 22 -> head 1 kept.
    Magnitude L2: head 0 = sqrt(4+4 + 1+1) = sqrt(10), head 1 = sqrt(1+4+1+4 + 1+1+1+1) = sqrt(14); L1: 6, 10."""
    gs, ctx = _named_heads()
    sp = get_criterion("wanda").group_scores(gs, ctx)
    torch.testing.assert_close(sp, T([6.0, 4.0]))
    summed = get_criterion("wanda", structured="sum").group_scores(gs, ctx)
    torch.testing.assert_close(summed, T([16.0, 22.0]))
    assert alloc.topk_keep(sp, 1).tolist() == [True, False]
    assert alloc.topk_keep(summed, 1).tolist() == [False, True]
    torch.testing.assert_close(get_criterion("magnitude").group_scores(gs, ctx), T([10.0**0.5, 14.0**0.5]))
    torch.testing.assert_close(get_criterion("magnitude", norm="l1").group_scores(gs, ctx), T([6.0, 10.0]))


def test_structured_options_leave_element_scores_alone():
    """structured= and norm= change group scores only: unstructured and N:M masks are the paper's."""
    for method in ("wanda", "magnitude"):
        _, ctx = _element_case(method)
        opts = [{"structured": "sp"}, {"structured": "sum"}] if method == "wanda" else [{"norm": "l2"}, {"norm": "l1"}]
        for o in opts:
            torch.testing.assert_close(get_criterion(method, **o).element_scores("l.weight", ctx), SCORES)


def test_layer_groups_wanda_sp_falls_back_to_the_sum():
    """A whole layer has no output-projection columns of its own: Wanda-sp scores it like 'sum'."""
    gs = GroupSet("layer", 0, 1, (Member("a.weight", 0, 2), Member("b.weight", 0, 1)), numels=(4, 2))
    ctx = ScoreContext(
        weights={"a.weight": T([[1.0, -2.0], [3.0, 0.0]]), "b.weight": T([[1.0, 1.0]])},
        act={"a": act([1.0, 4.0]), "b": act([9.0, 0.0])},
    )
    # a: 1 + 4 + 3 + 0 = 8; b: 3 + 0 = 3
    for structured in ("sp", "sum"):
        torch.testing.assert_close(get_criterion("wanda", structured=structured).group_scores(gs, ctx), T([11.0]))
    torch.testing.assert_close(get_criterion("magnitude").group_scores(gs, ctx), T([16.0**0.5]))


# ------------------------------------------------------------------------------------------------ SDM, coupled
def _gated_mlp_groupset() -> GroupSet:
    members = (Member("gate.weight", 0, 1), Member("up.weight", 0, 1), Member("down.weight", 1, 1))
    return GroupSet("mlp_neuron", 0, 2, members, numels=(4, 4, 4))


def test_sdm_coupled_statistic_hand_computed():
    """Two neurons i, hidden size 2 (j), two samples; W = 1 so s_n = |g_gate + g_up + g_down^T|."""
    gs = _gated_mlp_groupset()
    weights = {k: torch.ones(2, 2) for k in ("gate.weight", "up.weight", "down.weight")}
    stat = GroupGradientStats(gs, ("coupled",))
    # sample 1: s[0,0]=|1+1-2|=0, s[0,1]=|2-3+1|=0, s[1,0]=|0+1+0|=1, s[1,1]=|1+1+1|=3 -> mean_j = [0, 2]
    stat.update(
        {
            "gate.weight": T([[1.0, 2.0], [0.0, 1.0]]),
            "up.weight": T([[1.0, -3.0], [1.0, 1.0]]),
            "down.weight": T([[-2.0, 0.0], [1.0, 1.0]]),
        },
        weights,
    )
    torch.testing.assert_close(stat.sums["coupled"], T([0.0, 2.0]))
    # sample 2: s = |1 + 1 + 0| = 2 everywhere -> mean_j = [2, 2]
    stat.update(
        {"gate.weight": torch.ones(2, 2), "up.weight": torch.ones(2, 2), "down.weight": torch.zeros(2, 2)}, weights
    )
    torch.testing.assert_close(stat.sums["coupled"], T([2.0, 4.0]))
    assert stat.count == 2
    sdm = get_criterion("sdm")
    scores = sdm.group_scores(gs, ScoreContext(weights=weights, group={gs.key: stat}))
    torch.testing.assert_close(scores, T([2.0, 4.0]))
    assert alloc.topk_keep(scores, 1).tolist() == [False, True]


def test_sdm_coupled_statistic_matches_loop_formula():
    """s_n[i,j] = |g_gate w_gate + g_up w_up + g_down[j,i] w_down[j,i]|, score[i] = mean_j sum_n s_n[i,j]."""
    gs = GroupSet(
        "mlp_neuron",
        0,
        3,
        (Member("gate.weight", 0, 1), Member("up.weight", 0, 1), Member("down.weight", 1, 1)),
        numels=(12, 12, 12),
    )
    g = torch.Generator().manual_seed(0)

    def ints(*shape):
        return torch.randint(-3, 4, shape, generator=g).float()

    weights = {"gate.weight": ints(3, 4), "up.weight": ints(3, 4), "down.weight": ints(4, 3)}
    samples = [{"gate.weight": ints(3, 4), "up.weight": ints(3, 4), "down.weight": ints(4, 3)} for _ in range(2)]
    stat = GroupGradientStats(gs, ("coupled", "vector"))
    for s in samples:
        stat.update(s, weights)
    imp = [[0.0] * 4 for _ in range(3)]
    vector = [0.0] * 3
    for s in samples:
        for i in range(3):
            tot = 0.0
            for j in range(4):
                v = (
                    s["gate.weight"][i, j] * weights["gate.weight"][i, j]
                    + s["up.weight"][i, j] * weights["up.weight"][i, j]
                    + s["down.weight"][j, i] * weights["down.weight"][j, i]
                ).item()
                imp[i][j] += abs(v)
                tot += v
            vector[i] += abs(tot)
    expected = T([sum(row) / 4 for row in imp])
    torch.testing.assert_close(stat.sums["coupled"], expected)
    torch.testing.assert_close(stat.sums["vector"], T(vector))
    scores = get_criterion("sdm").group_scores(gs, ScoreContext(weights=weights, group={gs.key: stat}))
    torch.testing.assert_close(scores, expected)


def test_sdm_refuses_element_scores():
    with pytest.raises(ValueError, match="coupled groups only"):
        get_criterion("sdm").element_scores("x.weight", ScoreContext(weights={"x.weight": torch.ones(2, 2)}))


# ------------------------------------------------------------------------------- every criterion, element level
# One row whose scores are [8,7,6,1,2,3,4,5] under each criterion:
#   unstructured 50 %: top 4 = 8,7,6,5  -> [1,1,1,0,0,0,0,1]
#   2:4: top 2 of [8,7,6,1] and of [2,3,4,5] -> [1,1,0,0,0,0,1,1]
#   4:8: the same top 4 as unstructured for one 8-wide row
SCORES = T([[8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
EXPECTED = {
    "unstructured": [[1, 1, 1, 0, 0, 0, 0, 1]],
    "2:4": [[1, 1, 0, 0, 0, 0, 1, 1]],
    "4:8": [[1, 1, 1, 0, 0, 0, 0, 1]],
}


def _element_case(method: str) -> tuple[dict, ScoreContext]:
    ones = torch.ones(1, 8)
    if method == "magnitude":
        return {}, ScoreContext(weights={"l.weight": SCORES * T([1, -1, 1, -1, 1, -1, 1, -1.0])})
    if method == "wanda":
        w = T([[4.0, -7.0, 3.0, -1.0, 1.0, -3.0, 2.0, -5.0]])  # |w| * [2,1,2,1,...]
        return {}, ScoreContext(weights={"l.weight": w}, act={"l": act(T([2.0, 1.0] * 4) ** 2)})
    if method == "gblm":  # |W|=1, ||X||=1, alpha=1: 1 + G
        return {"alpha": 1.0}, ScoreContext(
            weights={"l.weight": -ones},
            act={"l": act(torch.ones(8))},
            grad={"l.weight": grad(sum_sq=(SCORES - 1) ** 2)},
        )
    if method == "gblm_l1":
        return {"alpha": 1.0, "gradient_norm": "l1"}, ScoreContext(
            weights={"l.weight": ones}, act={"l": act(torch.ones(8))}, grad={"l.weight": grad(sum_abs=SCORES - 1)}
        )
    if method == "taylor":
        w = T([[2.0, -1.0, 2.0, -1.0, 2.0, -1.0, 2.0, -1.0]])
        g = T([[4.0, 7.0, -3.0, 1.0, 1.0, 3.0, -2.0, -5.0]])
        return {}, ScoreContext(weights={"l.weight": w}, grad={"l.weight": grad(sum=g)})
    raise AssertionError(method)


@pytest.mark.parametrize("granularity", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm", "gblm_l1", "taylor"])
def test_element_granularities(method, granularity):
    opts, ctx = _element_case(method)
    crit = get_criterion(method.split("_")[0], **opts)
    crit.check_granularity(granularity)
    scores = crit.element_scores("l.weight", ctx)
    torch.testing.assert_close(scores, SCORES)
    if granularity == "unstructured":
        keep = alloc.select_unstructured(scores, 0.5, "row")
    else:
        n, m = (int(x) for x in granularity.split(":"))
        keep = alloc.select_nm(scores, n, m)
    assert keep.int().tolist() == EXPECTED[granularity]


def test_nm_masks_valid_on_random_scores():
    scores = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    for n, m in ((2, 4), (4, 8)):
        keep = nm_mask(scores, n, m)
        assert keep.shape == scores.shape and keep.dtype == torch.bool
        per_block = keep.reshape(6, 16 // m, m).sum(-1)
        assert (per_block == n).all()
        # kept entries are the top-n of their block
        blocks = scores.reshape(6, 16 // m, m)
        kept_min = blocks.masked_fill(~keep.reshape(blocks.shape), float("inf")).min(-1).values
        dropped_max = blocks.masked_fill(keep.reshape(blocks.shape), float("-inf")).max(-1).values
        assert (kept_min > dropped_max).all()


def test_nm_mask_rejects_bad_width():
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_select_nm_respects_previous_mask():
    # previously pruned column 0 (the best score) must not come back
    prev = keep_of([[0, 1, 1, 1]])
    keep = alloc.select_nm(T([[9.0, 1.0, 2.0, 3.0]]), 2, 4, prev_keep=prev)
    assert keep.int().tolist() == [[0, 0, 1, 1]]


def test_unstructured_exact_counts_row_and_layer():
    scores = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    keep = alloc.select_unstructured(scores, 0.3, "row")
    assert keep.sum(1).tolist() == [7, 7, 7, 7]  # floor(0.3*10)=3 removed per row
    keep = alloc.select_unstructured(scores, 0.3, "layer")
    assert int(keep.sum()) == 40 - 12
    # the removed entries are the 12 lowest of the tensor
    assert scores[~keep].max() < scores[keep].min()
    # ties: counts stay exact
    tied = torch.ones(3, 8)
    assert alloc.select_unstructured(tied, 0.5, "row").sum(1).tolist() == [4, 4, 4]
    assert int(alloc.select_unstructured(tied, 0.25, "layer").sum()) == 18
    with pytest.raises(ValueError, match="scope"):
        alloc.select_unstructured(tied, 0.5, "column")


def test_unstructured_monotone_counts_previous_pruning():
    scores = T([[4.0, 3.0, 2.0, 1.0]])
    prev = keep_of([[0, 1, 1, 1]])  # the best entry is already gone
    keep = alloc.select_unstructured(scores, 0.5, "row", prev_keep=prev)
    assert keep.int().tolist() == [[0, 1, 1, 0]]


def test_select_global_unstructured_one_threshold():
    scores = {"a": T([[1.0, 2.0], [3.0, 4.0]]), "b": T([[10.0, 20.0, 30.0, 0.5]])}
    keep = alloc.select_global_unstructured(scores, 0.5, {})
    assert keep["a"].int().tolist() == [[0, 0], [0, 1]]
    assert keep["b"].int().tolist() == [[1, 1, 1, 0]]


# ------------------------------------------------------------------------------ group selection and allocation
def test_query_head_partitions_keep_equal_counts():
    scores = T([8.0, 7.0, 6.0, 5.0, 1.0, 2.0, 3.0, 4.0])  # all best heads in partition 0
    assert alloc.topk_keep(scores, 4).int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert alloc.topk_keep(scores, 4, partitions=2).int().tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    keep = alloc.topk_keep(torch.randn(12, generator=torch.Generator().manual_seed(3)), 6, partitions=3)
    assert keep.view(3, 4).sum(1).tolist() == [2, 2, 2]
    # counts are rounded to whole partitions, at least one head per partition
    assert alloc.keep_counts_uniform([8], 0.5, partitions=2) == [4]
    assert alloc.keep_counts_uniform([8], 0.4, partitions=2) == [4]  # 5 -> 4
    assert alloc.keep_counts_uniform([8], 0.9, partitions=2) == [2]  # 1 -> 2 (one per partition)
    assert alloc.keep_counts_uniform([10, 7], 0.3) == [7, 5]


def test_owl_rates_mean_and_span():
    rates = alloc.owl_rates([0.1, 0.3, 0.2, 0.5], 0.5, lam=0.08)
    # scaled = [0, .08, .04, .16], mean .07 -> keep = [.43, .51, .47, .59]
    torch.testing.assert_close(T(rates, dtype=torch.float64), T([0.57, 0.49, 0.53, 0.41], dtype=torch.float64))
    assert sum(rates) / len(rates) == pytest.approx(0.5, abs=1e-12)
    assert max(rates) - min(rates) == pytest.approx(0.16, abs=1e-12)
    assert rates.index(min(rates)) == 3  # most outliers -> pruned least
    flat = alloc.owl_rates([0.2, 0.2, 0.2], 0.6)
    assert flat == pytest.approx([0.6, 0.6, 0.6])


def test_outlier_ratio_hand_computed():
    # mean of [1]*9 + [100] = 10.9; > 5 * 10.9 only the 100 -> 1/10
    assert alloc.outlier_ratio([torch.ones(3, 3), T([100.0])], m=5.0) == pytest.approx(0.1)
    assert alloc.outlier_ratio([torch.ones(4)], m=5.0) == 0.0


def test_keep_counts_global_bounds():
    scores = [T([5.0, 4.0, 3.0, 2.0]), T([1.0, 0.5, 0.2, 0.1])]
    assert alloc.keep_counts_global(scores, 0.5) == [4, 0]
    assert alloc.keep_counts_global(scores, 0.5, min_keep=0.5) == [2, 2]
    assert alloc.keep_counts_global(scores, 0.5, max_keep=0.75) == [3, 1]
    assert alloc.keep_counts_global(scores, 0.5, min_keep=0.25, max_keep=0.5) == [2, 2]
    # previously pruned groups rank last
    prev = [keep_of([0, 0, 0, 1]), None]
    assert alloc.keep_counts_global(scores, 0.5, prev=prev) == [1, 3]


def test_keep_counts_global_unsatisfiable():
    scores = [T([5.0, 4.0, 3.0, 2.0]), T([1.0, 0.5, 0.2, 0.1])]
    with pytest.raises(ValueError, match=r"min_keep=0.75.*cannot be met.*keeping 6\.\.8 groups.*keeps 4"):
        alloc.keep_counts_global(scores, 0.5, min_keep=0.75)
    with pytest.raises(ValueError, match=r"cannot be met.*keeping 0\.\.2 groups"):
        alloc.keep_counts_global(scores, 0.5, max_keep=0.25)


# --------------------------------------------------------------- structured scores on a real tiny llama layer
@pytest.fixture(scope="module")
def llama1():
    model = tiny_model("llama", layers=1, seed=0)
    return model, ModelStructure(model)


def _fake_ctx(model, structure, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = dict(model.named_parameters())
    acts, grads = {}, {}
    for name, lin in structure.layer_infos[0].linears.items():
        acts[name] = act(torch.rand(lin.in_features, generator=g) + 0.1)
        shape = lin.weight.shape
        grads[name + ".weight"] = grad(
            sum=torch.randn(shape, generator=g),
            sum_sq=torch.rand(shape, generator=g),
            sum_abs=torch.rand(shape, generator=g),
        )
    return ScoreContext(weights=weights, act=acts, grad=grads)


def _slices(structure, kind):
    """Hand description of group g: list of (linear path, dim, start, stop) per group."""
    hd, rep = structure.head_dim, structure.num_heads // structure.num_kv_heads
    p = "model.layers.0."
    if kind == "mlp_neuron":
        return [
            [(p + "mlp.gate_proj", 0, i, i + 1), (p + "mlp.up_proj", 0, i, i + 1), (p + "mlp.down_proj", 1, i, i + 1)]
            for i in range(64)
        ]
    if kind == "attention_head":
        return [
            [
                (p + "self_attn.q_proj", 0, g * rep * hd, (g + 1) * rep * hd),
                (p + "self_attn.k_proj", 0, g * hd, (g + 1) * hd),
                (p + "self_attn.v_proj", 0, g * hd, (g + 1) * hd),
                (p + "self_attn.o_proj", 1, g * rep * hd, (g + 1) * rep * hd),
            ]
            for g in range(2)
        ]
    if kind == "query_head":
        return [
            [(p + "self_attn.q_proj", 0, h * hd, (h + 1) * hd), (p + "self_attn.o_proj", 1, h * hd, (h + 1) * hd)]
            for h in range(4)
        ]
    if kind == "layer":
        return [[(n, 0, 0, lin.out_features) for n, lin in structure.layer_infos[0].linears.items()]]
    raise AssertionError(kind)


def _part(t, dim, a, b):
    return t[a:b] if dim == 0 else t[:, a:b]


# method id -> (criterion, options); the defaults first (Wanda-sp, magnitude's L2), then the other forms
GROUP_METHODS = {
    "magnitude": ("magnitude", {}),
    "magnitude_l1": ("magnitude", {"norm": "l1"}),
    "wanda": ("wanda", {}),
    "wanda_sum": ("wanda", {"structured": "sum"}),
    "gblm": ("gblm", {"alpha": 3.0}),
    "gblm_l1": ("gblm", {"gradient_norm": "l1", "alpha": 3.0}),
    "taylor": ("taylor", {}),
    "taylor_vector": ("taylor", {"mode": "vector"}),
}


@pytest.mark.parametrize("kind", ["mlp_neuron", "attention_head", "query_head", "layer"])
@pytest.mark.parametrize("method", list(GROUP_METHODS))
def test_group_scores_and_masks(llama1, method, kind):
    model, structure = llama1
    ctx = _fake_ctx(model, structure)
    name, opts = GROUP_METHODS[method]
    variant = method.partition("_")[2]
    crit = get_criterion(name, **opts)
    crit.check_granularity(kind)
    gs = structure.group_sets(kind)[0]

    def elem(lin):  # hand formula per criterion
        w = ctx.weights[lin + ".weight"].detach().float()
        if name == "magnitude":
            return w.abs() if variant == "l1" else w.square()
        norm = ctx.act[lin].sums["sum_sq"].sqrt()[None, :]
        gstat = ctx.grad[lin + ".weight"].sums
        if name == "wanda":
            return w.abs() * norm
        if name == "gblm":
            gg = gstat["sum_abs"] if variant == "l1" else gstat["sum_sq"].sqrt()
            return w.abs() * norm + 3.0 * w.abs() * gg
        return gstat["sum"] * w if variant else (gstat["sum"] * w).abs()

    expected = []
    for parts in _slices(structure, kind):
        if method == "wanda" and kind != "layer":  # Wanda-sp: only the down_proj / o_proj columns of the group
            parts = [p for p in parts if p[0].endswith(("mlp.down_proj", "self_attn.o_proj")) and p[1] == 1]
            assert len(parts) == 1
        tot = sum(_part(elem(lin), d, a, b).sum() for lin, d, a, b in parts)
        expected.append(tot.abs() if variant == "vector" else tot.sqrt() if method == "magnitude" else tot)
    expected = torch.stack(expected)
    scores = crit.group_scores(gs, ctx)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)

    # 50 % of the groups go (whole partitions for query heads); the masks zero exactly their slices
    if kind == "layer":
        return
    keep_n = alloc.keep_counts_uniform([gs.count], 0.5, gs.partitions)[0]
    keep = alloc.topk_keep(scores, keep_n, gs.partitions)
    assert int(keep.sum()) == gs.count // 2
    if gs.partitions > 1:
        assert keep.view(gs.partitions, -1).sum(1).tolist() == [1, 1]
        best = expected.view(2, 2).argmax(1)
        assert keep.view(2, 2).tolist() == [[c == int(best[p]) for c in range(2)] for p in range(2)]
    else:
        assert set(keep.nonzero().flatten().tolist()) == set(expected.argsort(descending=True)[:keep_n].tolist())
    masks = MaskSet()
    masks.set_groups(gs, keep)
    for gi, parts in enumerate(_slices(structure, kind)):
        for lin, d, a, b in parts:
            km = masks.keep_mask(lin + ".weight", ctx.weights[lin + ".weight"])
            assert bool(_part(km, d, a, b).all()) == bool(keep[gi])
            assert bool(_part(km, d, a, b).any()) == bool(keep[gi])


@pytest.mark.parametrize("kind", ["mlp_neuron", "attention_head", "query_head"])
def test_sdm_coupled_on_real_groupsets(llama1, kind):
    """The coupled statistic aligns each member on the hidden axis (the group's own rows summed first)."""
    model, structure = llama1
    gs = structure.group_sets(kind)[0]
    g = torch.Generator().manual_seed(5)
    weights = {m.name: structure.param(m.name).detach() for m in gs.members}
    samples = [{n: torch.randn(w.shape, generator=g) for n, w in weights.items()} for _ in range(2)]
    stat = GroupGradientStats(gs, ("coupled",))
    for s in samples:
        stat.update(s, weights)
    expected = torch.zeros(gs.count)
    for s in samples:
        for gi, parts in enumerate(_slices(structure, kind)):
            acc = torch.zeros(32)
            for lin, d, a, b in parts:
                gw = _part(s[lin + ".weight"] * weights[lin + ".weight"], d, a, b)
                acc += gw.sum(0) if d == 0 else gw.sum(1)  # over the group's own rows / columns
            expected[gi] += acc.abs().mean()
    torch.testing.assert_close(stat.sums["coupled"], expected, rtol=1e-5, atol=1e-6)
    sdm = get_criterion("sdm")
    sdm.check_granularity(kind)
    torch.testing.assert_close(sdm.group_scores(gs, ScoreContext(weights={}, group={gs.key: stat})), expected)


@pytest.mark.parametrize("order", ["members", "backward"])
@pytest.mark.parametrize("kind", ["mlp_neuron", "attention_head"])
def test_group_stats_member_by_member_close_each_set_early(llama1, kind, order):
    """Hook mode: once every member of a group set is added, its partial sums go into the statistics and are freed
    (a backward holds one layer's partial sums, not one per layer); the result equals the whole-sample update, in
    the members' order and in a backward's (the column member, down_proj / o_proj, first)."""
    model, structure = llama1
    gs = structure.group_sets(kind)[0]
    g = torch.Generator().manual_seed(6)
    weights = {m.name: structure.param(m.name).detach() for m in gs.members}
    samples = [{n: torch.randn(w.shape, generator=g) for n, w in weights.items()} for _ in range(2)]
    whole = GroupGradientStats(gs, ("coupled", "vector"))
    hooked = GroupGradientStats(gs, ("coupled", "vector"))
    for s in samples:
        whole.update(s, weights)
        names = [m.name for m in gs.members]
        names = names[::-1] if order == "backward" else names
        assert gs.members[-1].dim == 1  # the column member (down_proj / o_proj): last here, first in a backward
        for i, n in enumerate(names):
            before = {k: v.clone() for k, v in hooked.sums.items()}
            hooked.add_member(n, s[n], weights[n])
            if i < len(names) - 1:  # still open: partial sums held, statistics unchanged
                assert hooked._parts
                assert all(torch.equal(before[k], hooked.sums[k]) for k in before)
        assert not hooked._parts  # every member in: flushed at once, nothing held until close_sample
        hooked.close_sample()
    assert hooked.count == whole.count == 2
    for k in ("coupled", "vector"):
        torch.testing.assert_close(hooked.sums[k], whole.sums[k], rtol=1e-5, atol=1e-6)
    hooked.add_member(gs.members[0].name, samples[0][gs.members[0].name], weights[gs.members[0].name])
    hooked.close_sample()  # a member without a gradient: the open sums are still closed and counted
    assert hooked.count == 3 and not hooked._parts


def test_sdm_granularities_limited():
    sdm = get_criterion("sdm")
    for gran in ("unstructured", "2:4", "layer"):
        with pytest.raises(ValueError, match="does not support granularity"):
            sdm.check_granularity(gran)


def test_keep_counts_global_partitions():
    """Query heads: a layer keeps whole steps of one head per partition, and at least one per partition."""
    # layer 0: partitions [9,8] [7,6] -> steps score mean(9,7)=8, mean(8,6)=7; layer 1: [1,2] [3,4] -> 3, 2
    scores = [T([9.0, 8.0, 7.0, 6.0]), T([1.0, 2.0, 3.0, 4.0])]
    assert alloc.keep_counts_global(scores, 0.5) == [4, 0]  # without partitions layer 1 would lose every head
    assert alloc.keep_counts_global(scores, 0.5, partitions=2) == [2, 2]
    assert alloc.keep_counts_global(scores, 0.25, partitions=2) == [4, 2]
    for counts in (alloc.keep_counts_global(scores, s, partitions=2) for s in (0.0, 0.25, 0.5, 0.6)):
        assert all(c % 2 == 0 and c >= 2 for c in counts)
    with pytest.raises(ValueError, match="at least one per partition"):
        alloc.keep_counts_global(scores, 0.5, max_keep=0.25, partitions=2)


def test_global_query_head_pruning_keeps_heads_in_every_kv_group():
    from pruning import prune

    model = tiny_model("llama", layers=3)
    res = prune(model, method="magnitude", granularity="query_head", allocation="global", sparsity=0.5, progress=False)
    for key, keep in res.masks.groups.items():
        per_partition = keep.view(2, 2).sum(1)
        assert (per_partition >= 1).all() and per_partition[0] == per_partition[1], key
    assert sum(int(k.sum()) for k in res.masks.groups.values()) == 6  # 12 heads, 50 % kept
