"""Mutual-information redundancy: the estimator against its definition, planted copies removed first (exact and
clustered), the threshold rule, clustering bounds, and the per-sample activation statistic."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from tiny import calib, tiny_model

import pruning
from pruning.importance import CRITERIA, get_criterion
from pruning.importance.mi_random_pairs import gaussian_kl, random_pair_order
from pruning.importance.mutual_info import (
    RedundancyOrder,
    cluster_neurons,
    entropy2,
    mi2_matrix,
    mi_alpha_pairs,
    redundancy_order,
    renyi_entropy,
    silverman_width,
    standardize,
)
from pruning.importance.renyi import pair_redundancy
from pruning.stats import ActivationCollector, ActivationSamples, ActivationStats


def _gram(z: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-(z[:, None] - z[None, :]).square() / (2 * sigma**2))


# ------------------------------------------------------------------------------------------------- the estimator
def test_alpha2_closed_form_matches_the_definition():
    """S₂(A) = −log₂ tr(A²) with A = K/tr K, the joint on A∘B/tr(A∘B), I = S(A)+S(B)−S(A,B): written out here."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(40, 5, generator=g)
    Z[:, 1] = Z[:, 0] ** 2 + 0.1 * Z[:, 1]
    Zs, _ = standardize(Z)
    assert silverman_width(40, "normal") == pytest.approx(1.06 * 40**-0.2)
    sigma = silverman_width(40)
    assert sigma == pytest.approx(0.9 * 40**-0.2)

    def S(A):
        return -math.log2(float(torch.trace(A.double() @ A.double())))

    K = [_gram(Zs[:, k], sigma) for k in range(5)]
    M, ent = mi2_matrix(Zs, sigma, chunk=2)  # several blocks
    for k in range(5):
        assert float(ent[k]) == pytest.approx(S(K[k] / 40), abs=1e-4)
        for j in range(5):
            joint = K[k] * K[j]
            expected = S(K[k] / 40) + S(K[j] / 40) - S(joint / torch.trace(joint))
            assert float(M[k, j]) == pytest.approx(expected, abs=1e-3)
    torch.testing.assert_close(entropy2(Zs, sigma, chunk=3), ent)
    # the eigenvalue route (any α) agrees at α = 2
    pairs = torch.tensor([[0, 1], [2, 3], [4, 4]])
    mi, ent_eig = mi_alpha_pairs(Zs, pairs, 2.0, sigma)
    torch.testing.assert_close(ent_eig, ent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mi, torch.stack([M[0, 1], M[2, 3], M[4, 4]]), atol=1e-3, rtol=1e-3)
    # α → 1 approaches von Neumann entropy
    lam = torch.linalg.eigvalsh((K[0] / 40).double()).clamp_min(0)
    von_neumann = float(-(lam[lam > 0] * torch.log2(lam[lam > 0])).sum())
    assert float(renyi_entropy(K[0] / 40, 1.001)) == pytest.approx(von_neumann, rel=1e-2)


def test_robust_scale_ignores_a_few_extreme_tokens():
    """Silverman's robust scale min(std, IQR/1.349): a heavy tail sets the std, not the kernel width."""
    z = torch.linspace(-1.0, 1.0, 101)
    heavy = z.clone()
    heavy[:3] = torch.tensor([40.0, -50.0, 60.0])
    Z = torch.stack([z, heavy], 1)
    plain, _ = standardize(Z)
    robust, _ = standardize(Z, robust=True)
    iqr = (z.sort().values[75] - z.sort().values[25]) / 1.349
    torch.testing.assert_close(robust[:, 0], (z - z.mean()) / torch.minimum(z.std(unbiased=False), iqr))
    assert float(robust[50, 1] - robust[49, 1]) > 10 * float(plain[50, 1] - plain[49, 1])  # body resolved


def test_copies_score_one_and_independent_neurons_little():
    """ρ = I_kl / ((I_kk + I_ll)/2) is 1 for a copy (also rescaled, shifted, sign-flipped), small for independent."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 3, generator=g)
    Z = torch.stack([z[:, 0], -3 * z[:, 0] + 1, z[:, 1], z[:, 2]], 1)
    M, ent = mi2_matrix(standardize(Z)[0])
    self_info = M.diagonal()
    rho = M / ((self_info[:, None] + self_info[None, :]) / 2)
    assert float(rho[0, 1]) == pytest.approx(1.0, abs=1e-5)
    assert float(rho[0, 2]) < 0.2 and float(rho[2, 3]) < 0.2
    assert (M >= -1e-4).all() and (self_info < ent).all()  # I(Z;Z) < S(Z) in this estimator


# ---------------------------------------------------------------------------------------------- the greedy order
def _planted(n: int = 48, m: int = 256, pairs=((3, 40), (7, 12), (20, 33), (25, 47)), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.nn.functional.silu(torch.randn(m, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g)))
    for a, b in pairs:
        Z[:, b] = Z[:, a]
    return Z, pairs


@pytest.mark.parametrize("cluster_size", [None, 8])
def test_order_removes_one_of_each_copy_first(cluster_size):
    Z, pairs = _planted()
    order = redundancy_order(Z, cluster_size=cluster_size)
    first = set(order.scores.argsort()[: len(pairs)].tolist())
    assert all(len(first & {a, b}) == 1 for a, b in pairs), first
    assert (order.value[list(first)] > 0.999).all()
    assert sorted(order.scores.tolist()) == list(range(48))  # a full ranking
    if cluster_size:
        assert order.info["clusters"] > 1 and order.info["largest_cluster"] <= 2 * cluster_size
        assert order.info["pairs"] < 48 * 47 // 2
    assert order.keep_floor(0.999) == 48 - len(pairs)


def test_order_any_alpha_and_constant_neurons_first():
    Z, pairs = _planted(n=12, m=48, pairs=((1, 9), (4, 6)))
    Z[:, 3] = 0.0  # a dead (or already pruned) neuron carries no information: it goes first
    order = redundancy_order(Z, alpha=1.01, cluster_size=None)
    ranked = order.scores.argsort().tolist()
    assert ranked[0] == 3 and order.value[3] == float("inf")
    assert all(len(set(ranked[1:3]) & {a, b}) == 1 for a, b in pairs)


def test_clusters_are_bounded_and_keep_copies_together():
    g = torch.Generator().manual_seed(2)
    Z = torch.randn(64, 600, generator=g)
    Z[:, 500] = -2 * Z[:, 17]
    clusters = cluster_neurons(standardize(Z)[0], size=50)
    sizes = [c.numel() for c in clusters]
    assert sum(sizes) == 600 and max(sizes) <= 100
    assert torch.equal(torch.sort(torch.cat(clusters)).values, torch.arange(600))
    assert any(17 in c.tolist() and 500 in c.tolist() for c in clusters)


# ---------------------------------------------------------------------------------------- through pruning.prune
PAIRS = [(3, 40), (7, 12), (20, 55), (33, 60)]


@pytest.fixture(scope="module")
def planted_model():
    """A tiny llama whose neurons 40, 12, 55, 60 copy 3, 7, 20, 33 (same gate and up rows: identical activations)."""
    model = tiny_model("llama", layers=2, seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            for a, b in PAIRS:
                layer.mlp.gate_proj.weight[b] = layer.mlp.gate_proj.weight[a]
                layer.mlp.up_proj.weight[b] = layer.mlp.up_proj.weight[a]
    return model, calib(n=4, seq=32, seed=3)


@pytest.mark.parametrize("cluster_size", [None, 16])
def test_prune_removes_planted_copies_first(planted_model, cluster_size):
    model, batches = planted_model
    m = copy.deepcopy(model)
    res = pruning.prune(
        m,
        batches,
        method="mutual_info",
        sparsity=len(PAIRS) / 64,
        granularity="mlp_neuron",
        criterion_options={"cluster_size": cluster_size, "samples": 128},
        progress=False,
    )
    for layer in range(2):
        removed = set(torch.nonzero(~res.masks.groups[f"mlp_neuron.{layer}"]).flatten().tolist())
        assert len(removed) == len(PAIRS) and all(len(removed & {a, b}) == 1 for a, b in PAIRS), removed
    diag = res.info["diagnostics"]["mlp_neuron.0"]
    assert diag["samples"] == 128 and diag["neurons"] == 64 and "seconds" in diag
    # monotone: a second, larger event keeps the first removals (now constant neurons) and widths stay uniform
    res2 = pruning.prune(
        m,
        batches,
        method="mutual_info",
        sparsity=0.25,
        granularity="mlp_neuron",
        criterion_options={"cluster_size": cluster_size, "samples": 128},
        masks=res.masks,
        progress=False,
    )
    assert set(res2.info["kept_groups_per_layer"].values()) == {48}
    for layer in range(2):
        assert not (res2.masks.groups[f"mlp_neuron.{layer}"] & ~res.masks.groups[f"mlp_neuron.{layer}"]).any()


def test_prune_from_collected_statistics(planted_model):
    """The callback path: per-sample activations gathered by an ActivationCollector built from the criterion."""
    model, batches = planted_model
    m = copy.deepcopy(model)
    crit = get_criterion("mutual_info", samples=96)
    mods = {f"model.layers.{i}.mlp.down_proj": m.model.layers[i].mlp.down_proj for i in range(2)}
    coll = ActivationCollector(mods, **crit.collector_options()).attach()
    with torch.no_grad():
        for b in batches:
            m(input_ids=b)
    coll.detach()
    res = pruning.prune(
        m,
        None,
        method="mutual_info",
        sparsity=len(PAIRS) / 64,
        granularity="mlp_neuron",
        activations=coll,
        sequential=False,
        criterion_options={"samples": 96},
        progress=False,
    )
    removed = set(torch.nonzero(~res.masks.groups["mlp_neuron.1"]).flatten().tolist())
    assert all(len(removed & {a, b}) == 1 for a, b in PAIRS)
    plain = ActivationCollector(mods)
    with pytest.raises(KeyError, match="per-sample activations"):
        pruning.prune(
            copy.deepcopy(model),
            None,
            method="mutual_info",
            sparsity=0.1,
            granularity="mlp_neuron",
            activations=plain,
            sequential=False,
        )


def test_threshold_removes_only_pairs_above_it(planted_model):
    model, batches = planted_model
    res = pruning.prune(
        copy.deepcopy(model),
        batches,
        method="mutual_info",
        sparsity=0.5,
        granularity="mlp_neuron",
        criterion_options={"threshold": 0.999, "samples": 128},
        progress=False,
    )
    assert set(res.info["kept_groups_per_layer"].values()) == {64 - len(PAIRS)}
    with pytest.raises(ValueError, match="no global ranking"):  # ranks of different layers are not comparable
        pruning.prune(
            copy.deepcopy(model),
            batches,
            method="mutual_info",
            sparsity=0.2,
            granularity="mlp_neuron",
            allocation="global",
        )


def test_registration_and_refusals():
    assert "mutual_info" in CRITERIA
    crit = get_criterion("mutual_info", samples=64, seed=3)
    assert crit.collector_options() == {"kinds": ("sum_sq", "samples"), "samples": 64, "seed": 3}
    with pytest.raises(ValueError, match="does not support granularity='unstructured'"):
        crit.check_granularity("unstructured")
    with pytest.raises(ValueError, match="alpha=1"):
        get_criterion("mutual_info", alpha=1.0)
    with pytest.raises(ValueError, match="cluster_size"):
        get_criterion("mutual_info", cluster_size=1)


def test_owl_with_mutual_info(planted_model):
    model, batches = planted_model
    res = pruning.prune(
        copy.deepcopy(model),
        batches,
        method="mutual_info",
        sparsity=0.25,
        granularity="mlp_neuron",
        allocation="owl",
        owl_m=2.0,
        criterion_options={"samples": 64},
        progress=False,
    )
    rates = res.info["layer_rates"]
    assert rates[0] != rates[1] and sum(rates) / 2 == pytest.approx(0.25)


# ------------------------------------------------------------------------------ the paper's procedure (random pairs)
def test_random_pairs_remove_one_of_each_duplicate_first():
    """Exact duplicates (also rescaled, shifted, sign-flipped) and independent neurons: every seed's pass removes one
    member of each duplicate pair and nothing else, since no independent pair exceeds the threshold."""
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(256, 16, generator=g)
    dups = [(0, 9), (3, 12), (5, 14), (6, 15)]
    for i, (a, b) in enumerate(dups):
        Z[:, b] = (-1) ** i * (i + 1) * Z[:, a] + i
    scores, value, info = random_pair_order(Z, threshold=0.99, keep=12, seeds=4)
    first = set(scores.argsort()[:4].tolist())
    assert all(len(first & {a, b}) == 1 for a, b in dups), first
    assert (value[list(first)] > 0.99).all() and (value[[k for k in range(16) if k not in first]] == -math.inf).all()
    assert info["removed_per_seed"] == [4] * 4 and info["redundant_pairs"] == 4 and info["pairs"] == 120
    assert sorted(scores.tolist()) == list(range(16))  # a full ranking
    assert RedundancyOrder(scores, value, info).keep_floor(0.99) == 12  # the threshold's floor: nothing else goes


def test_random_pairs_seeds_differ_and_the_kl_criterion_chooses():
    """x ~ y and y ~ w exceed the threshold, x ~ w does not: the first pair visited decides whether x or y goes
    (the weaker of each pair by energy: x in (x, y), y in (y, w)). The KL criterion keeps the seed whose one removal
    changes the layer's output distribution least."""
    g = torch.Generator().manual_seed(1)
    base, other = torch.randn(512, generator=g), torch.randn(512, generator=g)
    Z = torch.randn(512, 8, generator=g)
    Z[:, 0], Z[:, 1], Z[:, 2] = base, 2 * (base + 0.35 * other), 3 * (base + 0.7 * other)
    w_out = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=0)  # energy = Σ z²: x < y < w
    Zr = standardize(Z, robust=True)[0]
    M, _ = pair_redundancy(Zr, sigma=silverman_width(512))
    xy, yw, xw = float(M[0, 1]), float(M[1, 2]), float(M[0, 2])
    others = M[3:, :].max().item()
    assert min(xy, yw) > xw > others  # the planted structure
    threshold = (min(xy, yw) + xw) / 2
    scores, value, info = random_pair_order(Z, threshold=threshold, w_out=w_out, keep=7, seeds=8)
    firsts = []  # which neuron each seed's pass removes first: x when it visits (x, y) first, else y
    for s in range(8):
        order = np.random.default_rng([0, s]).permutation(2)  # the two redundant pairs, (x, y) then (y, w)
        firsts.append(0 if order[0] == 0 else 1)
    assert set(firsts) == {0, 1}  # both orders occur among the seeds
    kl = {}
    for k in (0, 1):
        dense = Z @ w_out.T
        kl[k] = gaussian_kl(dense, dense - Z[:, [k]] @ w_out[:, [k]].T)
    assert info["kl_per_seed"] == pytest.approx([kl[f] for f in firsts])
    assert info["chosen_seed"] == int(np.argmin(info["kl_per_seed"])) and set(info["kl_at_removals"]) == {1}
    best = min((0, 1), key=lambda k: kl[k])
    assert int(scores.argmin()) == best  # the chosen seed's first removal goes first


def test_random_pairs_through_prune(planted_model):
    """The criterion's random-pairs mode on a model: the planted copies go first; the threshold is a floor."""
    model, batches = planted_model
    opts = {"mode": "random_pairs", "threshold": 0.99, "samples": 128, "seeds": 3}
    res = pruning.prune(
        copy.deepcopy(model),
        batches,
        "mutual_info",
        len(PAIRS) / 64,
        "mlp_neuron",
        criterion_options=opts,
        progress=False,
    )
    for layer in range(2):
        removed = set(torch.nonzero(~res.masks.groups[f"mlp_neuron.{layer}"]).flatten().tolist())
        assert len(removed) == len(PAIRS) and all(len(removed & {a, b}) == 1 for a, b in PAIRS), removed
    diag = res.info["diagnostics"]["mlp_neuron.0"]
    assert diag["mode"] == "random_pairs" and set(diag["kl_at_removals"]) == {len(PAIRS)}
    assert len(diag["kl_per_seed"]) == 3
    res = pruning.prune(
        copy.deepcopy(model), batches, "mutual_info", 0.25, "mlp_neuron", criterion_options=opts, progress=False
    )
    assert set(res.info["kept_groups_per_layer"].values()) == {64 - len(PAIRS)}  # no other pair is redundant
    with pytest.raises(ValueError, match="HINT: set threshold"):
        get_criterion("mutual_info", mode="random_pairs")
    with pytest.raises(ValueError, match="'clustered' or 'random_pairs'"):
        get_criterion("mutual_info", mode="exact")


# ------------------------------------------------------------------------------------ the per-sample statistic
def test_samples_are_a_seeded_uniform_subset_and_checkpoint():
    x = torch.arange(1000.0)[:, None].repeat(1, 3)
    a, b = ActivationSamples(64, seed=5), ActivationSamples(64, seed=5)
    for chunk in x.split(100):
        a.update(chunk)
        b.update(chunk)
    rows = a.compute()
    assert rows.shape == (64, 3) and torch.equal(rows, b.compute())
    assert rows[:, 0].unique().numel() == 64  # without replacement
    assert 300 < float(rows[:, 0].mean()) < 700  # drawn from the whole stream, not its start
    c = ActivationSamples(64, seed=5)
    c.load_state_dict(a.state_dict())
    a.update(x[:10] + 5000)
    c.update(x[:10] + 5000)
    assert torch.equal(a.compute(), c.compute())  # the generator state is checkpointed too
    few = ActivationStats(kinds=("samples",), samples=64)
    few.update(x[:10], mask=torch.arange(10) < 6)
    assert few.sample_rows().shape == (6, 3) and few.count == 6
    with pytest.raises(KeyError, match="samples"):
        ActivationStats().sample_rows()
    with pytest.raises(ValueError, match="unknown"):
        ActivationStats(kinds=("hessian",))


def _ddp_worker(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = torch.arange(400.0).view(100, 4)
        s = ActivationStats(kinds=("gram", "samples"), samples=32, seed=0)
        s.update(x[rank::2])  # each rank: half of the tokens
        s.reduce()
        lone = ActivationSamples(8, seed=0)  # rank 1 holds no rows (e.g. restarted from rank 0's checkpoint)
        if rank == 0:
            lone.update(x[:5])
        lone.reduce()  # a collective on both ranks all the same
        torch.save({"lone": lone.compute(), "lone_seen": lone.seen}, f"{path}.lone{rank}")
        if rank == 0:
            torch.save(
                {"gram": s.sums["gram"], "rows": s.sample_rows(), "seen": s.reservoir.seen, "count": s.count}, path
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_rank_reduce_of_gram_and_samples(tmp_path):
    """Gram matrices add up like every sum; the samples are the 32 smallest keys over both ranks' rows."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = str(tmp_path / "rank0.pt")
    mp.start_processes(_ddp_worker, args=(port, path), nprocs=2, join=True, start_method="fork")  # no re-imports
    got = torch.load(path)
    x = torch.arange(400.0).view(100, 4)
    torch.testing.assert_close(got["gram"], x.T @ x)
    assert got["count"] == 100 and got["seen"] == 100
    rows = got["rows"]
    assert rows.shape == (32, 4) and rows[:, 0].unique().numel() == 32
    first = (rows[:, 0] / 4).long()  # token index
    assert torch.equal(rows, x[first])
    assert (first % 2 == 0).any() and (first % 2 == 1).any()  # both ranks contribute
    for r in range(2):  # a rank with no rows gets rank 0's five
        lone = torch.load(f"{path}.lone{r}")
        assert lone["lone_seen"] == 5 and sorted(lone["lone"][:, 0].tolist()) == [0.0, 4.0, 8.0, 12.0, 16.0]
