"""The SVDQuant low-rank branch: L1 L2 from the top singular vectors of the smoothed weight.

SVDQuant (arXiv 2411.05007, sec. 4.2) splits the smoothed weight W^ = W diag(s) into a BF16
low-rank part L1 L2 that absorbs the outliers smoothing moved into the weight, and a residual
W^ - L1 L2 that is quantized to 4 bits. In numerics' layout the branch computes
``bf16(bf16(x^) @ L1) @ L2`` with L1 [K, R] and L2 [R, N], so (L1 @ L2).T ~= W^.

:func:`refine_low_rank` is deepcompressor's iteration (``calib/lowrank.py``,
QuantLowRankCalibrator): L <- SVD_r(W^ - Q(W^ - L)), keeping the best iterate.
"""
from __future__ import annotations

import torch

from ..kernels import numerics
from .gptq import rtn_quantize

# Randomized SVD (Halko, Martinsson, Tropp 2011, alg. 4.4): oversampling and power iterations.
# Below this size (min(N, K)) an exact SVD is cheap enough, and it is what small tests see.
_EXACT_SVD_MAX = 1024
_OVERSAMPLE = 16
_POWER_ITERS = 8
_SEED = 0  # fixed: the branch is a pure function of W^


def _check_rank(w_hat: torch.Tensor, rank: int) -> None:
    if w_hat.ndim != 2:
        raise ValueError(f"low_rank: expected a 2-D weight [N, K], got shape {tuple(w_hat.shape)}")
    if rank < 0 or rank > min(w_hat.shape):
        raise ValueError(f"low_rank: rank {rank} is outside [0, min(N, K) = {min(w_hat.shape)}] for a "
                         f"weight of shape {tuple(w_hat.shape)}; lower the rank for this layer")


def top_svd(a: torch.Tensor, rank: int, exact: bool | None = None):
    """Top-``rank`` singular triplets of ``a`` [N, K] in fp32: (U [N, r], S [r], Vh [r, K]).

    Exact (``torch.linalg.svd``) when ``exact`` or when min(N, K) <= 1024; otherwise a seeded
    randomized SVD with 16 oversampling columns and 8 power iterations - a few GEMMs instead of a
    full SVD of a 5120 x 13824 matrix, and deterministic (the test matrix comes from a fixed CPU
    seed, so CPU and CUDA draw the same one).
    """
    a = a.float()
    n, k = a.shape
    q = min(rank + _OVERSAMPLE, n, k)
    if exact or (exact is None and (min(n, k) <= _EXACT_SVD_MAX or 2 * q >= min(n, k))):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    omega = torch.randn(k, q, generator=torch.Generator().manual_seed(_SEED)).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q  # [N, q]
    for _ in range(_POWER_ITERS):  # re-orthonormalise each half-step against round-off
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ ub)[:, :rank], s[:rank], vh[:rank]


def low_rank(w_hat: torch.Tensor, rank: int, *, exact: bool | None = None):
    """Top-``rank`` SVD of the smoothed weight (SVDQuant, arXiv 2411.05007 sec. 4.2).

    w_hat: [N, K] = W diag(s). Returns (L1 bf16 [K, R], L2 bf16 [R, N]) with (L1 @ L2).T ~= W^.
    The singular values are split as sqrt(S) on both sides so that both factors have similar
    magnitudes in bf16. rank = 0 gives empty factors; rank > min(N, K) raises ValueError.
    """
    _check_rank(w_hat, rank)
    n, k = w_hat.shape
    if rank == 0:
        return (torch.zeros(k, 0, dtype=torch.bfloat16, device=w_hat.device),
                torch.zeros(0, n, dtype=torch.bfloat16, device=w_hat.device))
    u, s, vh = top_svd(w_hat, rank, exact)
    root = s.sqrt()
    l1 = (vh.T * root[None, :]).to(torch.bfloat16)  # [K, R]
    l2 = (root[:, None] * u.T).to(torch.bfloat16)  # [R, N]
    return l1.contiguous(), l2.contiguous()


def branch_weight(l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """(L1 L2)^T in fp32 [N, K], from the bf16 factors exactly as numerics.from_float forms it."""
    return (l1.float() @ l2.float()).T


def residual_error(w_hat: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor,
                   hessian: torch.Tensor | None = None) -> float:
    """Error of W^ ~= L1 L2 + Q_RTN(W^ - L1 L2): tr(E H E^T) with ``hessian`` (the layer-output
    error per input row, GPTQ's objective), else ||E||_F^2."""
    resid = w_hat.float() - branch_weight(l1, l2)
    e = resid - numerics.dequantize(*rtn_quantize(resid))
    if hessian is None:
        return float(e.double().square().sum())
    return float(((e @ hessian.float().to(e.device)) * e).double().sum())


def refine_low_rank(w_hat: torch.Tensor, rank: int, iters: int = 3, *,
                    hessian: torch.Tensor | None = None, exact: bool | None = None):
    """deepcompressor's low-rank refinement (``calib/lowrank.py``, QuantLowRankCalibrator).

    Start from L = SVD_r(W^) and repeat L <- SVD_r(W^ - Q(W^ - L)), Q numerics' RTN of weights
    (:func:`calibration.gptq.rtn_quantize`, what ``from_float`` applies): the branch then fits
    what the 4-bit residual cannot represent rather than W^ itself.
    Each candidate is scored by :func:`residual_error` (with the smoothed-space ``hessian``, if
    given, that is the expected layer-output error); the best is returned, and the loop stops at
    the first candidate that does not improve (deepcompressor's early stop). Returns (L1, L2) as
    :func:`low_rank`; ``iters = 0`` is plain :func:`low_rank`.
    """
    best = low_rank(w_hat, rank, exact=exact)
    if rank == 0 or iters <= 0:
        return best
    w = w_hat.float()
    best_err = residual_error(w, *best, hessian)
    cand = best
    for _ in range(iters):
        resid = w - branch_weight(*cand)
        cand = low_rank(w - numerics.dequantize(*rtn_quantize(resid)), rank, exact=exact)
        err = residual_error(w, *cand, hessian)
        if err >= best_err:
            break
        best, best_err = cand, err
    return best
