"""Mutual-information neuron redundancy (2024): unsupervised FFN-neuron pruning by the matrix-based Rényi α-entropy.

The estimator (Sánchez Giraldo, Rao & Príncipe's matrix-based Rényi α-entropy) over ``m`` samples of one neuron's
activation ``z``:

- Gaussian Gram matrix ``K[a, b] = exp(−(z_a − z_b)² / 2σ²)``, the width per neuron by Silverman's rule of thumb
  ``σ = 0.9 · min(std(z), IQR(z) / 1.349) · m^(−1/5)`` (``kernel_width='robust'``, default) or its normal-reference
  form ``σ = 1.06 · std(z) · m^(−1/5)`` (``'normal'``). FFN activations are heavy-tailed (std/IQR-scale has a median
  of 1.7 on the demo model): with the std, a few extreme tokens set the width, every other token looks alike, and
  neurons sharing those tokens look redundant; on the demo model the robust width halves the perplexity increase
  of a 10 % cut (6.78 vs 8.48, dense 5.60).
- ``A = K / tr K``; ``S_α(A) = 1/(1−α) · log₂ tr(A^α)``; joint ``S_α(A∘B / tr(A∘B))``;
  ``I(Z_k; Z_l) = S_α(A_k) + S_α(A_l) − S_α(A_k, A_l)``.

With α = 2 (the default) everything is a Frobenius norm: ``tr(A²) = ‖K‖_F² / m²`` and ``‖K_k∘K_l‖_F² = ⟨K_k², K_l²⟩``,
so all the pairs of a set of neurons are one matrix product of their vectorised ``K²`` (upper triangles, the
diagonal being 1): ``I = log₂(m² · ‖K_k∘K_l‖² / (‖K_k‖² ‖K_l‖²))``. Other α need an eigendecomposition per pair
(``m³`` each): small layers only.

Normalisation: in this estimator a neuron's information about itself, ``I(Z; Z) = 2S(A) − S(A∘A)``, is below its
entropy (the joint of ``Z`` with itself uses the product kernel, of width ``σ/√2``). Pairs are therefore ranked by
``ρ = I_kl / ((I_kk + I_ll) / 2)``; for α = 2, ``I_kl − (I_kk + I_ll)/2 = log₂ cos(K_k², K_l²) ≤ 0``, so ``ρ ≤ 1``
with equality exactly when the two Gram matrices coincide, i.e. ``z_l = a·z_k + b`` (a copy, up to sign and
scale). Without ``normalize`` raw bits are compared.

Scale: the exact all-pairs cost is ``n² m² / 2`` multiply-adds and ``n²`` memory for ``n`` neurons. Neurons are
therefore first clustered (sign-invariant spherical k-means on the standardised activation vectors, i.e. by
|correlation|, clusters of about ``cluster_size``, then every neuron joined to its most correlated neighbour where
k-means separated them) and MI is computed only within clusters: ``n · s · m² / 2`` with ``s`` the cluster size,
linear in width (plus an ``n² m`` correlation product, cheap next to it). A pair in different clusters counts as
not redundant; what this can miss is a strongly dependent but uncorrelated pair (e.g. ``z`` and ``z²`` centred),
which the exact mode (``cluster_size=None``) catches. Time and memory against width: ``benchmarks/mi_scaling.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..structure import GroupSet
from .base import Criterion, ScoreContext, register
from .mi_random_pairs import random_pair_order
from .renyi import (  # noqa: F401 (the estimator, re-exported: part of this criterion's public surface)
    entropy2,
    mi2_matrix,
    mi_alpha_pairs,
    pair_redundancy,
    renyi_entropy,
    silverman_width,
    standardize,
)


def cluster_neurons(Zs: torch.Tensor, size: int, iters: int = 10, seed: int = 0) -> list[torch.Tensor]:
    """Groups of about ``size`` neurons by sign-invariant spherical k-means on the unit activation vectors
    (similarity |correlation|); clusters over ``2·size`` are split again, then cut, so no cluster exceeds it; then
    each neuron joins its nearest neighbour where k-means separated them (:func:`_join_nearest`)."""
    n = Zs.shape[1]
    U = torch.nn.functional.normalize(Zs.T.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    todo = [(torch.arange(n), 0)]
    while todo:
        idx, depth = todo.pop()
        if idx.numel() <= 2 * size:
            out.append(idx)
            continue
        if depth >= 3:  # k-means does not separate them: cut into pieces
            out.extend(idx.split(size))
            continue
        X = U[idx]
        k = math.ceil(idx.numel() / size)
        centers = X[torch.randperm(idx.numel(), generator=gen)[:k].to(X.device)]
        for _ in range(iters):
            sim = X @ centers.T
            assign = sim.abs().argmax(1)
            sign = torch.sign(sim.gather(1, assign[:, None])).clamp_min(0) * 2 - 1
            new = torch.zeros_like(centers).index_add_(0, assign, X * sign)
            counts = torch.bincount(assign, minlength=k)
            empty = counts == 0
            if empty.any():  # re-seed empty clusters with the worst-fitting points
                worst = sim.abs().amax(1).argsort()[: int(empty.sum())]
                new[empty] = X[worst]
            centers = torch.nn.functional.normalize(new, dim=1)
        assign = (X @ centers.T).abs().argmax(1)
        for c in range(k):
            members = idx[assign.cpu() == c]
            if members.numel():
                todo.append((members, depth + 1) if members.numel() < idx.numel() else (members, 3))
    return _join_nearest(U, out, 2 * size)


@torch.no_grad()
def _join_nearest(U: torch.Tensor, clusters: list[torch.Tensor], cap: int, chunk: int = 1024) -> list[torch.Tensor]:
    """Refinement: a neuron whose nearest neighbour (highest |correlation|) k-means put elsewhere joins it.

    Strong redundancy is mostly between a neuron and its nearest neighbour, and a k-means boundary separates some
    such pairs (about a fifth of them in ``benchmarks/mi_scaling.py``). Pairs are visited from the most correlated
    down; a neuron that moved, or whose nearest neighbour is already with it, stays; no cluster grows beyond
    ``cap``. Cost: one ``n × n × m`` product in blocks of ``chunk`` rows."""
    n = U.shape[0]
    label = torch.empty(n, dtype=torch.long)
    for i, c in enumerate(clusters):
        label[c] = i
    best_val = torch.empty(n)
    best_idx = torch.empty(n, dtype=torch.long)
    for a in range(0, n, chunk):
        S = (U[a : a + chunk] @ U.T).abs_()
        rows = torch.arange(S.shape[0], device=S.device)
        S[rows, rows + a] = -1.0
        v, i = S.max(1)
        best_val[a : a + chunk], best_idx[a : a + chunk] = v.cpu(), i.cpu()
    sizes = torch.bincount(label, minlength=len(clusters)).tolist()
    lab, nn_idx = label.tolist(), best_idx.tolist()
    fixed = [False] * n
    for k in best_val.argsort(descending=True).tolist():
        j = nn_idx[k]
        if lab[k] != lab[j]:
            if not fixed[k] and sizes[lab[j]] < cap:
                sizes[lab[k]] -= 1
                sizes[lab[j]] += 1
                lab[k] = lab[j]
            elif not fixed[j] and sizes[lab[k]] < cap:
                sizes[lab[j]] -= 1
                sizes[lab[k]] += 1
                lab[j] = lab[k]
            else:
                continue
        fixed[k] = fixed[j] = True
    label = torch.tensor(lab)
    out = [torch.nonzero(label == c).flatten() for c in range(len(clusters))]
    return sorted((c for c in out if c.numel()), key=lambda t: int(t[0]))


@dataclass
class RedundancyOrder:
    """Result of :func:`redundancy_order`: ``scores`` (removal rank, higher = removed later = kept), ``value`` (the
    redundancy of the pair that removed each neuron; +inf for constant neurons, −inf for those never removed by a
    pair) and what it cost."""

    scores: torch.Tensor
    value: torch.Tensor
    info: dict

    def keep_floor(self, threshold: float | None) -> int:
        """Neurons that stay when only pairs above ``threshold`` lose a member (the greedy values never rise)."""
        if threshold is None:
            return 0
        return int((self.value <= threshold).sum())


def redundancy_order(
    Z: torch.Tensor,
    *,
    alpha: float = 2.0,
    normalize: bool = True,
    cluster_size: int | None = 128,
    kmeans_iters: int = 10,
    seed: int = 0,
    out_norm: torch.Tensor | None = None,
    victim: str = "weaker",
    kernel_width: str = "robust",
) -> RedundancyOrder:
    """Greedy removal order of the neurons (columns) of ``Z`` [m samples, n neurons] by mutual information.

    Repeatedly the most redundant pair of remaining neurons (highest MI, or with ``normalize`` the highest
    ``ρ = I_kl / ((I_kk + I_ll) / 2)``) loses one member. Which one (``victim``): ``weaker`` (default) the one with
    the smaller output energy ``Σ z² · ‖w_out‖²`` (``out_norm``: the norms of the neurons' output-projection
    columns; ``Σ z²`` without it), the other's information being kept at the larger magnitude; ``redundant`` the
    one more redundant with the *other* remaining neurons (its second-highest MI). Ties: the other key, then the
    higher index. Constant neurons (zero entropy: no information, e.g. already pruned) go first. Neurons left when
    no pair remains (one per cluster) go last, lowest entropy first. Score = the step at which a neuron goes.
    """
    t0 = time.perf_counter()
    m, n = Z.shape
    if m < 2:
        raise ValueError(f"mutual information needs at least 2 samples, got {m}")
    if victim not in ("weaker", "redundant"):
        raise ValueError(f"victim={victim!r} must be 'weaker' or 'redundant'")
    if kernel_width not in ("robust", "normal"):
        raise ValueError(f"kernel_width={kernel_width!r} must be 'robust' or 'normal'")
    Zs, constant = standardize(Z)  # clustering: by correlation
    Zk = standardize(Z, robust=True)[0] if kernel_width == "robust" else Zs  # kernels
    sigma = silverman_width(m, kernel_width)
    energy = Z.float().square().sum(0).cpu()
    if out_norm is not None:
        energy = energy * out_norm.float().cpu().square()
    energy = energy.numpy()
    active = torch.nonzero(~constant).flatten()
    if cluster_size is None or active.numel() <= cluster_size:
        clusters = [active] if active.numel() else []
    else:
        local = cluster_neurons(Zs[:, active], cluster_size, kmeans_iters, seed)
        clusters = [active[c] for c in local]
    t1 = time.perf_counter()
    entropy = torch.zeros(n)
    mats: list[np.ndarray] = []
    pairs = 0
    for c in clusters:
        M, ent = pair_redundancy(Zk[:, c.to(Zk.device)], alpha, sigma, normalize)
        entropy[c] = ent
        mats.append(M.numpy())
        pairs += c.numel() * (c.numel() - 1) // 2
    t2 = time.perf_counter()
    scores, value = _greedy(n, clusters, mats, constant.cpu().numpy(), entropy.numpy(), energy, victim)
    t3 = time.perf_counter()
    info = {
        "neurons": n,
        "samples": m,
        "clusters": len(clusters),
        "largest_cluster": max((int(c.numel()) for c in clusters), default=0),
        "pairs": pairs,
        "seconds": {"cluster": t1 - t0, "mi": t2 - t1, "greedy": t3 - t2},
    }
    return RedundancyOrder(torch.from_numpy(scores).float(), torch.from_numpy(value).float(), info)


def _greedy(n, clusters, mats, constant, entropy, energy, victim) -> tuple[np.ndarray, np.ndarray]:
    scores = np.zeros(n, dtype=np.float64)
    value = np.full(n, -np.inf)
    step = 0
    for k in sorted(np.flatnonzero(constant).tolist(), key=lambda k: (energy[k], k)):
        scores[k], value[k] = step, np.inf
        step += 1
    kept = ~constant.copy()
    cl_of = np.full(n, -1)
    pos = np.zeros(n, dtype=np.int64)
    members = [c.numpy() for c in clusters]
    r = np.full(n, -np.inf, dtype=np.float32)  # max redundancy of each kept neuron with the kept others
    arg = np.full(n, -1)
    for ci, (mem, M) in enumerate(zip(members, mats)):
        cl_of[mem] = ci
        pos[mem] = np.arange(mem.size)
        if mem.size > 1:
            r[mem] = M.max(1)
            arg[mem] = mem[M.argmax(1)]
    while True:
        a = int(np.argmax(r))
        if not np.isfinite(r[a]):
            break
        b = int(arg[a])
        val = float(r[a])
        ci = cl_of[a]
        M, mem = mats[ci], members[ci]
        second = []
        for x, y in ((a, b), (b, a)):
            row = M[pos[x]].copy()
            row[pos[y]] = -np.inf
            second.append(row.max())
        if victim == "weaker":
            key_a, key_b = (-energy[a], second[0], a), (-energy[b], second[1], b)
        else:
            key_a, key_b = (second[0], -energy[a], a), (second[1], -energy[b], b)
        v = a if key_a > key_b else b
        kept[v] = False
        scores[v], value[v] = step, val
        step += 1
        M[:, pos[v]] = -np.inf
        M[pos[v], :] = -np.inf
        r[v] = -np.inf
        stale = mem[(arg[mem] == v) & kept[mem]]
        if stale.size:
            rows = M[pos[stale]]
            r[stale] = rows.max(1)
            arg[stale] = mem[rows.argmax(1)]
    rest = sorted(np.flatnonzero(kept).tolist(), key=lambda k: (entropy[k], energy[k], -k))
    for k in rest:
        scores[k] = step
        step += 1
    return scores, value


@register
@dataclass
class MutualInfo(Criterion):
    """Mutual-information redundancy of FFN neurons (``granularity='mlp_neuron'``), unsupervised.

    Statistics: the activations of each neuron (the input of the MLP output projection, ``down_proj``/``fc2``) on
    ``samples`` calibration tokens drawn uniformly with ``seed`` (``ActivationStats`` kind ``samples``). **A sample
    is one token**: the FFN acts on each position separately, so two neurons are redundant when they carry the same
    information token by token. The estimator, the clustering that makes it scale and the greedy order are in
    :func:`redundancy_order` and the module docstring: kernel width by Silverman's rule (``kernel_width``: robust
    scale by default, ``normal`` for ``1.06 · std · m^(−1/5)``), α = 2 by default (``tr(A²) = ‖A‖_F²``),
    ``normalize`` (default) ranks pairs by ``ρ = I_kl / ((I_kk + I_ll) / 2)`` ≤ 1, so an exact copy scores 1
    whatever its entropy; raw bits otherwise. ``victim``: which member of a pair goes, ``weaker`` (smaller
    ``Σ z² · ‖down_proj[:, k]‖²``, default) or ``redundant`` (more redundant with the rest).

    The criterion measures redundancy only, not importance: on the demo model (trained byte-level Llama, 512 neurons
    per layer, little redundancy) it loses clearly to Wanda and magnitude at the same neuron rate; it is meant
    for models with redundant neurons, as in the paper (BERT-tiny), and as an unsupervised, label-free option.

    Selection: the group score is the removal order, so keeping the top ``k`` is the procedure stopped at the target
    rate; per layer, with the default uniform allocation (same width everywhere: a stock config). Two procedures
    (``mode``):

    - ``clustered`` (default, scalable): greedily, the member of the most redundant remaining pair goes first, pairs
      taken within |correlation| clusters (:func:`redundancy_order`). ``threshold`` (optional): only pairs whose
      redundancy exceeds it lose a member.
    - ``random_pairs`` (the paper's own procedure, :mod:`pruning.importance.mi_random_pairs`): random pairs of all
      the layer's neurons, one of a pair pruned when its redundancy exceeds ``threshold`` (required), stopped at
      the target, repeated for ``seeds`` random seeds, the seed whose pruned layer output is closest to the dense
      one (KL) kept. Exact all-pairs MI per layer: for layers of the paper's size.

    With a threshold ``sparsity`` is an upper bound (the layers may then keep different widths).
    ``element_scores`` are Wanda's ``|W|·‖X_j‖₂``, used only for OWL's layer outlier ratios. ``diagnostics``
    records per layer the clusters or seeds, pairs evaluated and seconds spent.
    """

    name = "mutual_info"
    needs_activations = True
    act_kinds = ("sum_sq", "samples")
    global_ranking = False
    granularities = ("mlp_neuron",)
    samples: int = 256
    seed: int = 0
    alpha: float = 2.0
    normalize: bool = True
    cluster_size: int | None = 128
    kmeans_iters: int = 10
    threshold: float | None = None
    kernel_width: Literal["robust", "normal"] = "robust"
    victim: Literal["weaker", "redundant"] = "weaker"
    mode: Literal["clustered", "random_pairs"] = "clustered"
    seeds: int = 5

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"mutual_info samples={self.samples} must be >= 2 (256 is a good default)")
        if self.alpha <= 0 or self.alpha == 1:
            raise ValueError(f"mutual_info alpha={self.alpha} must be > 0 and != 1 (Rényi order; 2 is fast)")
        if self.cluster_size is not None and self.cluster_size < 2:
            raise ValueError(f"mutual_info cluster_size={self.cluster_size} must be >= 2, or null for all pairs")
        if self.kernel_width not in ("robust", "normal"):
            raise ValueError(f"mutual_info kernel_width={self.kernel_width!r} must be 'robust' or 'normal'")
        if self.victim not in ("weaker", "redundant"):
            raise ValueError(f"mutual_info victim={self.victim!r} must be 'weaker' or 'redundant'")
        if self.mode not in ("clustered", "random_pairs"):
            raise ValueError(f"mutual_info mode={self.mode!r} must be 'clustered' or 'random_pairs'")
        if self.mode == "random_pairs" and self.threshold is None:
            raise ValueError(
                "mutual_info mode='random_pairs' prunes one of a pair whose redundancy exceeds a threshold. HINT: "
                "set threshold (e.g. 0.5 for the normalised ρ, where a copy scores 1)"
            )
        if self.seeds < 1:
            raise ValueError(f"mutual_info seeds={self.seeds} must be >= 1")
        self.diagnostics: dict[str, dict] = {}
        self._floors: dict[str, int] = {}

    def collector_options(self) -> dict:
        return {"kinds": self.act_kinds, "samples": self.samples, "seed": self.seed}

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        w = ctx.weights[name].detach().float()
        return w.abs() * ctx.act_norm(name).to(w.device)[None, :]

    def group_scores(self, gs: GroupSet, ctx: ScoreContext) -> torch.Tensor:
        if gs.kind != "mlp_neuron":
            raise ValueError(f"mutual_info scores MLP neurons only, not {gs.kind!r}")
        out_member = next(m for m in gs.members if m.dim == 1)
        module = out_member.name.rsplit(".", 1)[0]
        stats = ctx.act.get(module)
        if stats is None or getattr(stats, "reservoir", None) is None:
            raise KeyError(
                f"no per-sample activations for {module}: mutual_info needs ActivationCollector(..., "
                "**criterion.collector_options()) (kinds=('sum_sq', 'samples'))"
            )
        Z = stats.sample_rows()
        if Z.shape[1] != gs.count:
            raise ValueError(f"{module}: {Z.shape[1]} activations per sample for {gs.count} neurons")
        w_out = ctx.weights[out_member.name].detach().float()
        if self.mode == "random_pairs":
            order = RedundancyOrder(
                *random_pair_order(
                    Z,
                    threshold=float(self.threshold),
                    w_out=w_out,
                    keep=ctx.keep.get(gs.key),
                    seeds=self.seeds,
                    seed=self.seed,
                    alpha=self.alpha,
                    normalize=self.normalize,
                    kernel_width=self.kernel_width,
                    victim=self.victim,
                )
            )
            self._floors[gs.key] = order.keep_floor(self.threshold)
            self.diagnostics[gs.key] = order.info
            return order.scores
        order = redundancy_order(
            Z,
            alpha=self.alpha,
            normalize=self.normalize,
            cluster_size=self.cluster_size,
            kmeans_iters=self.kmeans_iters,
            seed=self.seed,
            out_norm=w_out.norm(dim=0),
            victim=self.victim,
            kernel_width=self.kernel_width,
        )
        self._floors[gs.key] = order.keep_floor(self.threshold)
        self.diagnostics[gs.key] = order.info
        return order.scores

    def min_keep_count(self, gs: GroupSet) -> int:
        return self._floors.get(gs.key, 0)
