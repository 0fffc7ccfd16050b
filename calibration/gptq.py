"""GPTQ on numerics' two-level weight grid (4-bit value x integer group factor x fp32 row scale).

GPTQ (arXiv 2210.17323, alg. 1) quantizes the columns of W one at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of
the layer input, so that ||(W - Q) x|| rather than ||W - Q|| is minimised. The loop is the
reference implementation's (and gpt-fast's): Cholesky factor of H^-1, blocks of 128 columns with
a rank-128 "lazy batch" update of the rest, optional act-order (columns by decreasing H_jj).

The grid of numerics has two levels, and they are fixed at different times:

- the row scale is fixed from the whole (initial) row before the loop (``numerics.choose_grid``);
- the integer factor of a group of 64 is chosen when the loop first reaches a column of that
  group, from the group's *current* (error-updated) weights, by numerics' own rules: the factor
  rule of ``choose_grid`` against the fixed row maximum, as numerics' weight RTN
  (``quantize_weight_rows``) does. Every value is rounded by
  ``numerics.quantize_to_grid``; nothing here re-implements a rounding rule, so a change of the
  grid in numerics carries over (and a diagonal Hessian reproduces numerics' RTN bit for bit).

With act-order the groups stay the natural contiguous groups of 64 ("static groups" of the
reference code): the permutation changes the order in which columns are quantized, never which
factor a column uses, so the result is numerics' layout.

SVDQuant (arXiv 2411.05007) runs this on the residual W^ - L1 L2 in the smoothed space, with the
Hessian of the smoothed input (:func:`calibration.hessian.smoothed_hessian`).
"""
from __future__ import annotations

import logging

import torch

from ..kernels import numerics

log = logging.getLogger(__name__)

_DAMP_RETRIES = 6  # damping x10 per retry: 1 % ... 1e4 %, then give up


def rtn_quantize(w: torch.Tensor):
    """Round-to-nearest weights as ``numerics.from_float`` rounds them without GPTQ
    (``numerics.quantize_weight_rows``): (q int8 [N, K], scale fp32 [N], factor uint8 [N, G])."""
    return numerics.quantize_weight_rows(w.float())


def _group_factor(cur: torch.Tensor, scale: torch.Tensor, rmax: torch.Tensor) -> torch.Tensor:
    """numerics' weight factor [N] for one group ``cur`` [N, 64] of rows whose maximum is ``rmax``.

    ``choose_grid`` takes the row maximum from its input, so the group goes in beside a pad group
    holding ``rmax``: the row maximum seen is then max(rmax, amax of the group) - the fixed one,
    unless error feedback pushed the group past it, where both give the largest factor.
    """
    pad = torch.zeros_like(cur)
    pad[:, 0] = rmax
    _, f = numerics.choose_grid(torch.cat([cur, pad], dim=1))
    f = f[:, :1]
    return f[:, 0]


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, retrying with 10x damping.

    GPTQ (arXiv 2210.17323 sec. 4, "Cholesky reformulation") needs H^-1 only through this factor.
    A Hessian from few rows, or with nearly collinear channels, can fail the factorization in
    fp32; more damping makes it better conditioned at the cost of a less informed update.
    """
    mean_diag = h.diagonal().mean()
    for attempt in range(_DAMP_RETRIES):
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            del hd
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                if attempt:
                    log.warning("GPTQ: Cholesky succeeded with damping %.3g of the mean diagonal", damp)
                return u
        log.warning("GPTQ: Cholesky failed with damping %.3g of the mean diagonal; retrying with %.3g",
                    damp, damp * 10)
        damp *= 10
    raise RuntimeError(f"GPTQ: the Hessian is not positive definite even with damping {damp / 10:.3g} "
                       f"of its mean diagonal; check the captured statistics of this layer")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, *, damp: float = 0.01, block: int = 128,
                  act_order: bool = True):
    """GPTQ (arXiv 2210.17323, alg. 1) of ``w`` [N, K] on numerics' signed two-level grid.

    ``h`` [K, K]: the Hessian of the input the weight multiplies (any positive multiple: only
    its shape matters), i.e. for a smoothed residual the Hessian of x^ = (x + shift) / s.
    ``damp``: fraction of mean(diag H) added to the diagonal (1 %, as GPTQ and SVDQuant).
    ``block``: columns per lazy-batch update (128). ``act_order``: quantize columns by decreasing
    H_jj, with static groups (see the module doc). Weights are always on the signed grid, whatever the
    layer's activation grid (an unsigned post-GELU input's shift is already in ``h``).

    Returns (q int8 [N, K] in [-8, 7], scale fp32 [N], factor uint8 [N, K // 64]), ready for
    ``numerics.from_float(..., residual_q=(q, scale, factor))``. Columns whose input is always 0
    (H_jj = 0) are quantized to 0, as in the reference implementation.
    """
    n, k = w.shape
    numerics.check_k(k, "in_features")
    if h.shape != (k, k):
        raise ValueError(f"gptq_quantize: Hessian of shape {tuple(h.shape)} for a weight with K = {k}")
    if block <= 0:
        raise ValueError(f"gptq_quantize: block must be positive, got {block}")
    dev = w.device
    W = w.detach().float().clone()
    H = h.detach().to(dev, torch.float32).clone()
    if not bool(torch.isfinite(H).all()) or not bool(torch.isfinite(W).all()):
        raise ValueError("gptq_quantize: the weight or the Hessian holds NaN or inf")

    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    # Level 1: the row scale, from the whole row, before any error feedback.
    scale, _ = numerics.choose_grid(W)
    rmax = W.abs().amax(1)

    if act_order:
        perm = torch.sort(H.diagonal(), descending=True, stable=True).indices
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(k, device=dev)
    hinv = _inverse_cholesky(H, damp)
    del H

    # Columns become rows here ([K, N], contiguous), so each step below reads and writes
    # contiguous memory. The loop is launch-bound (about nine small kernels per column), so the
    # division by the Cholesky diagonal is folded into the rows of its factor once per block.
    WT = W.T.contiguous()
    del W
    g_of_pos = (perm // numerics.GROUP).tolist()  # group of each (permuted) column, on the host
    pos_of_g = torch.sort(perm.cpu()).indices.reshape(-1, numerics.GROUP)  # [G, 64] positions
    factor = torch.ones(k // numerics.GROUP, n, device=dev)
    step = torch.zeros_like(factor)  # scale * factor, for the error feedback only
    touched = [False] * (k // numerics.GROUP)
    QT = torch.empty(k, n, dtype=torch.int8, device=dev)

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = WT[i1:i2].clone()
        E1 = torch.empty_like(W1)  # rounding errors w - Q(w) of this block's columns
        hs = hinv[i1:i2, i1:] / hinv[i1:i2, i1:].diagonal()[:, None]  # rows of U / U_ii
        for i in range(i2 - i1):
            g = g_of_pos[i1 + i]
            if not touched[g]:
                # Level 2: the group's factor from its current weights. Columns in this block are
                # current in W1; later ones still miss this block's pending lazy update.
                pos = pos_of_g[g]
                here, later = pos < i2, pos >= i2
                cur = torch.empty(numerics.GROUP, n, device=dev)
                cur[here.to(dev)] = W1[(pos[here] - i1).to(dev)]
                if bool(later.any()):
                    lp = pos[later].to(dev)
                    cur[later.to(dev)] = WT[lp] - hs[:i, lp - i1].T @ E1[:i]
                factor[g] = _group_factor(cur.T, scale, rmax).float()
                step[g] = scale * factor[g]
                touched[g] = True
            col = W1[i]
            # numerics rounds groups of 64; the column, repeated 64 times, is one such group.
            q = numerics.quantize_to_grid(col[:, None].expand(n, numerics.GROUP), scale, factor[g][:, None])[:, 0]
            QT[i1 + i] = q
            e = torch.addcmul(col, q, step[g], value=-1.0, out=E1[i])  # w - Q(w)
            W1[i + 1:].addr_(hs[i, i + 1:i2 - i1], e, alpha=-1.0)
        WT[i2:].addmm_(hs[:, i2 - i1:].T, E1, alpha=-1.0)

    Q = QT.T
    inv = torch.argsort(perm)
    return Q[:, inv].contiguous(), scale, factor.T.to(torch.uint8).contiguous()
