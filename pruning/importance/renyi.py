"""The matrix-based Rényi α-entropy estimator (Sánchez Giraldo, Rao & Príncipe) of mutual information between
neurons' activations, shared by both modes of :mod:`pruning.importance.mutual_info`.

Over ``m`` samples of one neuron's activation ``z``: a Gaussian Gram matrix ``K[a, b] = exp(−(z_a − z_b)² / 2σ²)``
(width by Silverman's rule, :func:`silverman_width`, on the scale :func:`standardize` divides by), ``A = K / tr K``,
``S_α(A) = 1/(1−α) · log₂ tr(A^α)``, joint ``S_α(A∘B / tr(A∘B))``,
``I(Z_k; Z_l) = S_α(A_k) + S_α(A_l) − S_α(A_k, A_l)``.
With α = 2 everything is a Frobenius norm and all the pairs of a set of neurons are one matrix product
(:func:`mi2_matrix`); other α need an eigendecomposition per pair (:func:`mi_alpha_pairs`).
"""

from __future__ import annotations

import math

import torch


def standardize(Z: torch.Tensor, robust: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron centred ``Z`` [m, n] (fp32) divided by its scale: the standard deviation, or with ``robust``
    Silverman's ``min(std, IQR / 1.349)`` (the std where the IQR is 0). Constant neurons (std 0) become zeros.
    Returns ``(Zs, constant)``."""
    Z = Z.float()
    std = Z.std(0, unbiased=False)
    constant = std <= 1e-12 * Z.abs().amax(0).clamp_min(1.0)
    scale = std
    if robust:
        m = Z.shape[0]
        srt = Z.sort(0).values
        iqr = (srt[int(0.75 * (m - 1))] - srt[int(0.25 * (m - 1))]) / 1.349
        scale = torch.where(iqr > 0, torch.minimum(std, iqr), std)
    Zs = (Z - Z.mean(0)) / torch.where(constant, torch.ones_like(std), scale)
    Zs[:, constant] = 0.0
    return Zs, constant


def silverman_width(m: int, rule: str = "robust") -> float:
    """Kernel width in units of the scale :func:`standardize` divides by: ``0.9 · m^(−1/5)`` (``robust``, with the
    robust scale) or ``1.06 · m^(−1/5)`` (``normal``, the normal-reference rule, with the std)."""
    return (0.9 if rule == "robust" else 1.06) * m**-0.2


def k2_upper(Zs: torch.Tensor, iu: tuple[torch.Tensor, torch.Tensor], sigma: float) -> torch.Tensor:
    """``K²`` of each neuron (columns of ``Zs`` [m, c]) at the pairs ``a < b``: [c, m(m−1)/2]."""
    Zt = Zs.T.contiguous()
    arg = Zt.index_select(1, iu[0]).sub_(Zt.index_select(1, iu[1])).square_().div_(-sigma * sigma)
    # K² = exp(−d²/σ²) for K = exp(−d²/2σ²). Entries below e⁻³⁵ ≈ 6e-16 are set to 0: they change sums of at least
    # m by < m²·1e-15, and left in they reach the subnormal range (in K² or in products of two), where x86 float
    # arithmetic is ~20x slower.
    tiny = arg < -35.0
    return arg.exp_().masked_fill_(tiny, 0.0)


def entropy2(Zs: torch.Tensor, sigma: float | None = None, chunk: int = 256) -> torch.Tensor:
    """``S₂(A_k)`` in bits for every neuron (column of standardised ``Zs``)."""
    m = Zs.shape[0]
    sigma = sigma or silverman_width(m)
    iu = torch.triu_indices(m, m, 1, device=Zs.device)
    out = []
    for a in range(0, Zs.shape[1], chunk):
        fro = m + 2 * k2_upper(Zs[:, a : a + chunk], (iu[0], iu[1]), sigma).sum(1, dtype=torch.float64)  # ‖K‖_F²
        out.append(2 * math.log2(m) - torch.log2(fro))
    return torch.cat(out).float()


def mi2_matrix(Zs: torch.Tensor, sigma: float | None = None, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs ``I₂(Z_k; Z_l)`` in bits [n, n] (the diagonal is the self-information ``I₂(Z_k; Z_k)``) and the
    entropies ``S₂(A_k)`` [n], for the columns of standardised ``Zs`` [m, n]. Blocks of ``chunk`` neurons: memory
    ``O(n² + chunk · m²)``."""
    m, n = Zs.shape
    sigma = sigma or silverman_width(m)
    iu = torch.triu_indices(m, m, 1, device=Zs.device)
    iu = (iu[0], iu[1])
    log_fro = torch.empty(n, dtype=torch.float64, device=Zs.device)
    M = torch.empty(n, n, dtype=torch.float32, device=Zs.device)
    for a in range(0, n, chunk):
        Ga = k2_upper(Zs[:, a : a + chunk], iu, sigma)
        log_fro[a : a + chunk] = torch.log2(m + 2 * Ga.sum(1).double())
        for b in range(a, n, chunk):
            Gb = Ga if b == a else k2_upper(Zs[:, b : b + chunk], iu, sigma)
            joint = torch.log2(m + 2 * (Ga @ Gb.T).double())  # log₂ ‖K_k∘K_l‖_F²
            M[a : a + chunk, b : b + chunk] = joint.float()
            if b != a:
                M[b : b + chunk, a : a + chunk] = joint.T.float()
    # I = 2 log₂ m − log₂‖K_k‖² − log₂‖K_l‖² + log₂‖K_k∘K_l‖², added a block of rows at a time (no n² temporary)
    for a in range(0, n, chunk):
        M[a : a + chunk] += (2 * math.log2(m) - log_fro[a : a + chunk, None] - log_fro[None, :]).float()
    entropy = (2 * math.log2(m) - log_fro).float()
    return M, entropy


def renyi_entropy(A: torch.Tensor, alpha: float) -> torch.Tensor:
    """``S_α(A) = 1/(1−α) · log₂ tr(A^α)`` for trace-normalised PSD matrices ``A`` [..., m, m] (eigenvalues)."""
    lam = torch.linalg.eigvalsh(A.double()).clamp_min(0)
    return torch.log2((lam**alpha).sum(-1)) / (1 - alpha)


def mi_alpha_pairs(
    Zs: torch.Tensor, pairs: torch.Tensor, alpha: float, sigma: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``I_α`` for the given neuron ``pairs`` [p, 2] (a pair ``(k, k)`` gives the self-information) and every
    neuron's ``S_α``, by eigendecompositions (any α)."""
    m, n = Zs.shape
    sigma = sigma or silverman_width(m)
    K = torch.exp(-(Zs.T[:, :, None] - Zs.T[:, None, :]).square() / (2 * sigma * sigma))  # [n, m, m]
    ent = renyi_entropy(K / m, alpha)
    mi = torch.empty(pairs.shape[0], dtype=torch.float64)
    for s in range(0, pairs.shape[0], 64):
        p = pairs[s : s + 64]
        J = K[p[:, 0]] * K[p[:, 1]]
        joint = renyi_entropy(J / J.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None], alpha)
        mi[s : s + 64] = ent[p[:, 0]] + ent[p[:, 1]] - joint
    return mi.float(), ent.float()


def pair_redundancy(
    Zk: torch.Tensor, alpha: float = 2.0, sigma: float | None = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs redundancy of the columns of standardised ``Zk`` [m, c] (on the CPU, fp32, the diagonal ``−inf``)
    and their entropies: ``I_α(Z_k; Z_l)`` in bits, or with ``normalize`` ``ρ = I_kl / ((I_kk + I_ll) / 2)``
    (1 for a copy up to sign and scale, see :mod:`pruning.importance.mutual_info`)."""
    c = Zk.shape[1]
    if alpha == 2.0:
        M, ent = mi2_matrix(Zk, sigma)
    else:
        iu = torch.triu_indices(c, c, 0)
        mi, ent = mi_alpha_pairs(Zk.cpu(), iu.T, alpha, sigma)
        M = torch.zeros(c, c)
        M[iu[0], iu[1]] = mi
        M = M + M.T - torch.diag(M.diagonal())
    M, ent = M.cpu(), ent.cpu()
    if normalize:
        half = M.diagonal().clone().div_(2).clamp_min_(1e-12)
        for a in range(0, M.shape[0], 1024):  # in place, by rows: all-pairs mode holds n² floats once
            M[a : a + 1024].div_(half[a : a + 1024, None] + half[None, :])
    M.fill_diagonal_(float("-inf"))
    return M.float(), ent
