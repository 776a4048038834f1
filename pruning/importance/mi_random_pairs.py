"""The mutual-information paper's own procedure (Huang, Song & Pao, 2024), ``mutual_info`` with
``mode='random_pairs'``: random pairs of FFN neurons; when ``I(Z_k; Z_l)`` exceeds a threshold one of the pair is
pruned; the procedure stops at the target; it is repeated with several random seeds and the seed whose pruned layer
is closest to the dense one by a KL criterion is kept.

Choices where the paper leaves a detail open (documented here and in the README's methods table):

- *Random pairs* are visited without replacement, in a random order of all pairs of the layer's neurons (a pair
  whose member is gone is skipped). Since the MI of a pair does not change when other neurons go, one pass is the
  whole procedure: afterwards no remaining pair exceeds the threshold. Only pairs above the threshold can prune,
  so the pass visits those alone, in their random order; their MI comes from the exact all-pairs matrix
  (:func:`~pruning.importance.renyi.pair_redundancy`: ``n² m² / 2`` work, ``n²`` memory — the paper's scale,
  BERT-tiny; the clustered mode is the scalable one).
- *Which one of a pair* goes: ``victim`` as in the clustered mode (default: the smaller output energy).
- *Stop at the target*: the pass goes on past it, so that the scores rank every neuron; the first removals are the
  procedure stopped at the target (what top-k keeps). Neurons no pair removes are never pruned by the procedure:
  the threshold sets a floor (``min_keep_count``).
- *KL criterion*: the criterion sees one layer's statistics, so the distributions compared are the layer's MLP
  outputs on the calibration tokens, ``y = Z W_outᵀ`` dense and with each seed's removals (at the target, when the
  pruner gives it), each output feature a Gaussian fitted over the tokens: ``Σ_d KL(N(μ_d, s_d²) ‖ N(μ'_d, s'_d²))``.
  The lowest wins (ties: the lowest seed).
- *Kernel width*: Silverman's rule (``kernel_width``), as in the clustered mode.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .renyi import pair_redundancy, silverman_width, standardize


def gaussian_kl(y0: torch.Tensor, y1: torch.Tensor) -> float:
    """``Σ_d KL(N(μ0_d, s0_d²) ‖ N(μ1_d, s1_d²))`` of the columns of ``y0``, ``y1`` [samples, features], each
    feature fitted as a Gaussian over the samples (variances floored at 1e-8 of the mean dense variance)."""
    y0, y1 = y0.double(), y1.double()
    v0, v1 = y0.var(0, unbiased=False), y1.var(0, unbiased=False)
    floor = 1e-8 * float(v0.mean().clamp_min(1e-30))
    v0, v1 = v0.clamp_min(floor), v1.clamp_min(floor)
    d = (y0.mean(0) - y1.mean(0)).square()
    return float(0.5 * (torch.log(v1 / v0) + (v0 + d) / v1 - 1).sum())


def _one_pass(
    M: np.ndarray, pairs: np.ndarray, order: np.ndarray, energy: np.ndarray, victim: str
) -> tuple[list[int], list[float]]:
    """One seed's pass over the redundant ``pairs`` [p, 2] (local indices) in ``order``: the neurons removed, in
    order, and the redundancy of the pair that removed each."""
    alive = np.ones(M.shape[0], dtype=bool)
    removed: list[int] = []
    values: list[float] = []
    for p in order:
        i, j = int(pairs[p, 0]), int(pairs[p, 1])
        if not (alive[i] and alive[j]):
            continue
        if victim == "weaker":
            key_i, key_j = (-energy[i], i), (-energy[j], j)
        else:  # the one more redundant with the other remaining neurons goes
            others = alive.copy()
            others[[i, j]] = False
            rest_i = M[i, others].max() if others.any() else -np.inf
            rest_j = M[j, others].max() if others.any() else -np.inf
            key_i, key_j = (rest_i, -energy[i], i), (rest_j, -energy[j], j)
        v = i if key_i > key_j else j
        alive[v] = False
        removed.append(v)
        values.append(float(M[i, j]))
    return removed, values


def _layer_output_kl(Z: torch.Tensor, w_out: torch.Tensor | None, gone: torch.Tensor) -> float:
    """KL of the layer's MLP output ``Z W_outᵀ`` (or ``Z``) without the neurons ``gone``, from the dense one."""
    Zf = Z.float().cpu()
    if w_out is None:
        return gaussian_kl(Zf, Zf.index_fill(1, gone, 0.0))
    W = w_out.float().cpu()
    dense = Zf @ W.T
    return gaussian_kl(dense, dense - Zf[:, gone] @ W[:, gone].T)


def _ranking(constant, energy, active, removed, values, ent, act_energy) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (removal steps) and pair values: constant neurons first, then ``removed`` in order, then the rest."""
    n = constant.numel()
    scores = torch.zeros(n)
    value = torch.full((n,), float("-inf"))
    step = 0
    for k in sorted(torch.nonzero(constant).flatten().tolist(), key=lambda k: (float(energy[k]), k)):
        scores[k], value[k] = step, float("inf")
        step += 1
    for local, v in zip(removed, values):
        k = int(active[local])
        scores[k], value[k] = step, v
        step += 1
    left = set(range(active.numel())) - set(removed)
    for local in sorted(left, key=lambda i: (float(ent[i]), float(act_energy[i]), -int(active[i]))):
        scores[int(active[local])] = step
        step += 1
    return scores, value


def random_pair_order(
    Z: torch.Tensor,
    *,
    threshold: float,
    w_out: torch.Tensor | None = None,
    keep: int | None = None,
    seeds: int = 5,
    seed: int = 0,
    alpha: float = 2.0,
    normalize: bool = True,
    kernel_width: str = "robust",
    victim: str = "weaker",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The paper's procedure on the neurons (columns) of ``Z`` [m samples, n neurons]: ``(scores, value, info)``.

    ``scores``: the removal rank (higher = kept longer): constant neurons first (no information; e.g. pruned
    earlier), then the chosen seed's removals in order, then the neurons no redundant pair removed (lowest entropy
    first). ``value``: the redundancy (ρ, or bits without ``normalize``) of the pair that removed each neuron; +inf
    for constant neurons, −inf for those never removed. ``w_out`` [d, n]: the output projection (the KL criterion
    compares ``Z W_outᵀ``; without it, ``Z`` itself); ``keep``: the neurons the layer keeps at this event (the KL
    is compared there; default: at the shortest pass). ``info``: what each seed did and which one won.
    """
    t0 = time.perf_counter()
    m, n = Z.shape
    if m < 2:
        raise ValueError(f"mutual information needs at least 2 samples, got {m}")
    Zs, constant = standardize(Z)
    Zk = standardize(Z, robust=True)[0] if kernel_width == "robust" else Zs
    active = torch.nonzero(~constant).flatten()
    M, ent = pair_redundancy(Zk[:, active.to(Zk.device)], alpha, silverman_width(m, kernel_width), normalize)
    Mn = M.numpy()
    energy = Z.float().square().sum(0).cpu()
    if w_out is not None:
        energy = energy * w_out.float().cpu().norm(dim=0).square()
    act_energy = energy[active].numpy()
    iu = np.triu_indices(active.numel(), 1)
    redundant = np.flatnonzero(Mn[iu] > threshold)
    pairs = np.stack([iu[0][redundant], iu[1][redundant]], 1)
    t1 = time.perf_counter()
    runs = []
    for s in range(seeds):
        order = np.random.default_rng([seed, s]).permutation(len(pairs))
        runs.append(_one_pass(Mn, pairs, order, act_energy, victim))
    need = None if keep is None else max(0, n - keep - int(constant.sum()))
    # each seed compared at the removals it makes toward the target; seeds that get closer to it go first
    at = [min(len(r[0]), need if need is not None else min(len(q[0]) for q in runs)) for r in runs]
    kls = [_layer_output_kl(Z, w_out, active[removed[:k]]) for (removed, _), k in zip(runs, at)]
    best = min(range(len(runs)), key=lambda i: (-at[i], kls[i]))
    removed, values = runs[best]
    scores, value = _ranking(constant, energy, active, removed, values, ent, act_energy)
    info = {
        "mode": "random_pairs",
        "neurons": n,
        "samples": m,
        "pairs": int(active.numel() * (active.numel() - 1) // 2),
        "redundant_pairs": int(len(pairs)),
        "threshold": threshold,
        "removed_per_seed": [len(r[0]) for r in runs],
        "kl_per_seed": kls,
        "kl_at_removals": at,
        "chosen_seed": best,
        "seconds": {"mi": t1 - t0, "passes": time.perf_counter() - t1},
    }
    return scores, value, info
