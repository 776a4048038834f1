"""SparseGPT (Frantar & Alistarh, 2023): optimal-brain-surgeon pruning with weight reconstruction, layer by layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..options import STRUCTURED
from .base import NM, Criterion, Keep, Pruned, ScoreContext, register


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, max_retries: int = 6) -> tuple[torch.Tensor, dict]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``UᵀU = (H + λI)⁻¹``), ``λ = percdamp · mean(diag H)``.

    When a factorisation fails (``H`` indefinite through rounding, or singular with no damping) the damping is
    raised tenfold (from 1 % when it was 0) and the factorisation retried, up to ``max_retries`` times. Returns
    ``U`` and ``{"percdamp", "damp", "retries"}`` as used."""
    mean_diag = float(H.diagonal().mean())
    p = percdamp
    for attempt in range(max_retries + 1):
        damp = p * mean_diag
        Hd = H.clone()
        Hd.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            # (H + λI)⁻¹ as a solve against the identity: the same matrix, and on CPU 8-25x faster than
            # torch.cholesky_inverse (LAPACK potri), which dominated SparseGPT's time there
            eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
            U, info = torch.linalg.cholesky_ex(torch.cholesky_solve(eye, L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()) and bool((U.diagonal() > 0).all()):
                return U, {"percdamp": p, "damp": damp, "retries": attempt}
        p = p * 10 if p > 0 else 0.01
    raise RuntimeError(
        f"SparseGPT: the Cholesky factorisation of the damped Hessian failed {max_retries + 1} times (last damping "
        f"{p / 10:g} of the mean diagonal). HINT: use more calibration tokens, or raise percdamp / max_retries"
    )


def _per_block(total: float, start: int, stop: int) -> int:
    """How many of ``[start, stop)`` go when ``floor(total · i)`` of the first ``i`` go (exact overall counts)."""
    return int(math.floor(total * stop + 1e-9)) - int(math.floor(total * start + 1e-9))


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    scope: Literal["layer", "row"] = "layer",
    prev_keep: torch.Tensor | None = None,
    max_retries: int = 6,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune ``W`` [out, in] to ``sparsity`` (or N:M) and update the kept weights so that ``ŴX`` stays close to
    ``WX``, given ``H = 2XXᵀ`` [in, in] of the layer's calibration inputs. Returns ``(keep, W_new, info)``; the math
    is fp32 whatever ``W``'s dtype, and ``W_new`` is exactly zero where ``keep`` is False.

    The algorithm of the paper (its Algorithm 1): with ``U`` the upper Cholesky factor of ``(H + λI)⁻¹``, the
    columns are eliminated left to right; pruning (or keeping) column ``j`` of the current weights gives the error
    ``e = (w_j − q_j) / U[j,j]`` and the optimal-brain-surgeon update of the not yet processed columns
    ``W[:, j:] −= e · U[j, j:]`` (the row of ``H⁻¹`` restricted to them, so no inverse is recomputed). Updates
    are applied lazily: within a block of ``blocksize`` columns immediately, to the columns after the block once
    per block (``W[:, end:] −= E · U[block, end:]``), which gives the same result with matrix products.

    Mask selection is adaptive, on the weights as updated so far, by the OBS saliency ``w_j² / U[j,j]²`` (twice the
    increase of ``‖WX − ŴX‖²`` when ``w_j`` is removed and the later columns compensate), ``U[j,j]²`` being the
    diagonal of the inverse Hessian of the columns not yet eliminated. (The paper writes ``w² / [H⁻¹]²_jj`` with
    ``H⁻¹`` standing for this Cholesky factor.)

    - unstructured: at the start of each column block. ``scope='layer'`` (default; the paper's selection, as in its
      reference code and llm-compressor): one threshold over the block's rows × columns, so the sparsity of a row
      adapts to its saliencies, and the layer loses exactly ``floor(sparsity · out · in)`` weights in all.
      ``scope='row'`` (Wanda's comparison group): every row loses its share of the block's columns, the shares
      rounded cumulatively so that every row loses exactly ``floor(sparsity · in)`` weights in all.
    - N:M: at every group of M columns, the N highest-saliency weights of each row are kept.

    Columns whose input is always zero (``H_jj = 0``) cost nothing to prune on the calibration data: their saliency
    is 0. Entries pruned before (``prev_keep`` False) are pruned again (monotone masks). ``info``: the damping used
    (``percdamp``, ``damp``), ``retries`` of the Cholesky factorisation, and ``loss`` = Σ e²/2, the OBS estimate of
    ``‖WX − ŴX‖²_F`` on the calibration data (with ``H = 2XXᵀ``; per token when ``H`` is divided by the tokens).
    """
    _check_inputs(W, H, sparsity, nm, scope, blocksize)
    obs = _Elimination(W, H, percdamp, max_retries, prev_keep)
    in_f = W.shape[1]
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        keep = obs.block_keep(i1, i2, sparsity, scope) if nm is None else None
        obs.eliminate(i1, i2, keep, nm)
    return obs.result()


def _check_inputs(W: torch.Tensor, H: torch.Tensor, sparsity, nm, scope: str, blocksize: int) -> None:
    if (sparsity is None) == (nm is None):
        raise ValueError("sparsegpt_prune needs exactly one of sparsity=... or nm=(n, m)")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    if scope not in ("row", "layer"):
        raise ValueError(f"scope={scope!r}: sparsegpt compares weights per 'row' or per 'layer' within a block")
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({in_f}, {in_f}) for W of shape {tuple(W.shape)}")
    if nm is not None:
        n, m = nm
        if in_f % m or blocksize % m:
            raise ValueError(f"N:M {n}:{m} needs in_features ({in_f}) and blocksize ({blocksize}) divisible by {m}")


class _Elimination:
    """The state of :func:`sparsegpt_prune`'s column-by-column elimination: the weights as updated so far (fp32),
    the Cholesky factor ``U``, the keep mask, and the OBS loss."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, percdamp: float, max_retries: int, prev_keep) -> None:
        dev = W.device
        self.W = W.detach().float().clone()
        H = H.detach().to(dev, torch.float32).clone()
        self.dead = H.diagonal() == 0
        H.diagonal()[self.dead] = 1.0  # an input that is always zero: an identity row keeps H invertible
        self.U, self.info = inverse_cholesky(H, percdamp, max_retries)
        self.forced = None if prev_keep is None else ~prev_keep.to(dev, torch.bool)
        self.keep = torch.ones(W.shape, dtype=torch.bool, device=dev)
        self.loss = torch.zeros((), dtype=torch.float64, device=dev)

    def saliency(self, w: torch.Tensor, d: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """OBS saliency ``w² / U[j,j]²`` of columns ``[a, b)``; dead inputs 0, entries pruned before -inf."""
        s = w.square() / d.square()[None, :]
        s[:, self.dead[a:b]] = 0.0
        if self.forced is not None:
            s = s.masked_fill(self.forced[:, a:b], float("-inf"))
        return s

    def block_keep(self, i1: int, i2: int, sparsity: float, scope: str) -> torch.Tensor:
        """Unstructured: the keep mask of columns ``[i1, i2)``, chosen at the start of the block."""
        W1, d = self.W[:, i1:i2], self.U[i1:i2, i1:i2].diagonal()
        K1 = torch.ones_like(W1, dtype=torch.bool)
        s = self.saliency(W1, d, i1, i2)
        if scope == "row":
            k = _per_block(sparsity, i1, i2)
            if k:
                K1.scatter_(1, torch.topk(s, k, dim=1, largest=False).indices, False)
        else:
            k = _per_block(sparsity * self.W.shape[0], i1, i2)
            if k:
                K1.view(-1)[torch.topk(s.flatten(), k, largest=False).indices] = False
        if self.forced is not None:
            K1 &= ~self.forced[:, i1:i2]
        return K1

    def eliminate(self, i1: int, i2: int, K1: torch.Tensor | None, nm: tuple[int, int] | None) -> None:
        """Eliminate columns ``[i1, i2)`` left to right (an N:M pattern chosen at every group of M columns, when
        ``K1`` is None), then update the columns after the block at once."""
        W, U = self.W, self.U
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        E1 = torch.zeros_like(W1)
        if K1 is None:
            K1 = torch.ones_like(W1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                self._nm_group(W1, d, K1, i1, j, nm)
            w = W1[:, j]
            q = w * K1[:, j]
            e = (w - q) / d[j]
            W1[:, j:].sub_(e[:, None] * U1[j, j:][None, :])
            W1[:, j] = q
            E1[:, j] = e
        self.loss += E1.double().square().sum() / 2
        W[:, i1:i2] = W1
        self.keep[:, i1:i2] = K1
        if i2 < W.shape[1]:
            W[:, i2:].sub_(E1 @ U[i1:i2, i2:])

    def _nm_group(self, W1: torch.Tensor, d: torch.Tensor, K1: torch.Tensor, i1: int, j: int, nm) -> None:
        """N:M: the N highest-saliency weights of each row of the group of M columns starting at ``j``."""
        n, m = nm
        s = self.saliency(W1[:, j : j + m], d[j : j + m], i1 + j, i1 + j + m)
        K1[:, j : j + m].scatter_(1, torch.topk(s, m - n, dim=1, largest=False).indices, False)
        if self.forced is not None:
            K1[:, j : j + m] &= ~self.forced[:, i1 + j : i1 + j + m]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        self.W.masked_fill_(~self.keep, 0.0)
        self.info["loss"] = float(self.loss)
        return self.keep, self.W, self.info


@register
@dataclass
class SparseGPT(Criterion):
    """SparseGPT: OBS saliency ``w² / [H⁻¹]_jj`` with ``H = 2XXᵀ + λI`` and reconstruction of the kept weights.

    ``H`` comes from the calibration inputs of each Linear (``ActivationStats`` kind ``gram``, fp32, normalised by
    the token count: the scale of ``H`` changes neither the mask nor the update); ``λ = percdamp · mean(diag H)``
    (1 %), raised tenfold and retried when the Cholesky factorisation fails; columns are processed in blocks of
    ``blocksize`` (128). Selection and update: :func:`sparsegpt_prune`. Unstructured masks are chosen per block of
    columns: by default by one threshold over the block's rows × columns, each row's sparsity adapting (the paper's
    selection: ``scope='layer'``, this criterion's ``default_scope``); with ``scope='row'`` each row loses the same
    share (exact counts per row, Wanda's comparison group). N:M per group of M columns. Like the other activation
    methods it runs one decoder layer at a time (``pruning.prune``), the next layer seeing the pruned layer's
    outputs.

    This is not a pure score: the kept weights change (``Criterion.reconstructs``). :meth:`element_scores` are
    Wanda's ``|W|·‖X_j‖₂``, used only where a score without reconstruction is needed: OWL's layer outlier ratios.
    Structured granularities (neurons, heads, layers) are refused: the method removes and compensates single
    weights.
    """

    name = "sparsegpt"
    needs_activations = True
    act_kinds = ("sum_sq", "gram")
    reconstructs = True
    global_ranking = False
    default_scope = "layer"
    granularities = ("unstructured", "n:m")
    blocksize: int = 128
    percdamp: float = 0.01
    max_retries: int = 6

    def __post_init__(self) -> None:
        self.diagnostics: dict[str, dict] = {}  # per weight: damping used, retries, OBS loss (pruning.prune's info)
        if self.blocksize < 1:
            raise ValueError(f"sparsegpt blocksize={self.blocksize} must be >= 1 (the paper uses 128)")
        if self.percdamp < 0:
            raise ValueError(f"sparsegpt percdamp={self.percdamp} must be >= 0 (the paper uses 0.01)")
        if self.max_retries < 0:
            raise ValueError(f"sparsegpt max_retries={self.max_retries} must be >= 0")

    def check_granularity(self, granularity: str) -> None:
        if granularity in STRUCTURED:
            raise ValueError(
                f"method='sparsegpt' prunes and reconstructs single weights: granularity={granularity!r} is not "
                "supported. HINT: use 'unstructured', '2:4' or '4:8', or a scoring criterion (wanda, gblm, "
                "taylor, ...) for neurons, heads or layers"
            )
        super().check_granularity(granularity)

    def element_scores(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        w = ctx.weights[name].detach().float()
        return w.abs() * ctx.act_norm(name).to(w.device)[None, :]

    def hessian(self, name: str, ctx: ScoreContext) -> torch.Tensor:
        """``H = 2XXᵀ / tokens`` of the Linear owning ``name``."""
        module = name.rsplit(".", 1)[0]
        stats = ctx.act.get(module)
        if stats is None or "gram" not in stats.sums:
            raise KeyError(
                f"no Gram matrix for {module}: sparsegpt needs ActivationCollector(..., "
                "**criterion.collector_options()) (kinds=('sum_sq', 'gram'))"
            )
        return stats.sums["gram"] * (2.0 / max(stats.count, 1))

    def prune_weight(
        self, name: str, ctx: ScoreContext, sparsity: float, nm: NM, scope: str, prev_keep: Keep
    ) -> Pruned:
        w = ctx.weights[name]
        keep, w_new, info = sparsegpt_prune(
            w,
            self.hessian(name, ctx).to(w.device),
            None if nm else sparsity,
            nm,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            scope=scope,
            prev_keep=prev_keep,
            max_retries=self.max_retries,
        )
        self.diagnostics[name] = info
        return keep, w_new, info
