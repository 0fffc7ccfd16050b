"""SVDQuant smoothing: migrate activation outliers into the weight, alpha searched per layer.

SVDQuant (arXiv 2411.05007, sec. 4.1, after SmoothQuant arXiv 2211.10438) divides each input
channel by s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) and multiplies the weight column by it;
the outliers the weight absorbs are then taken by the low-rank branch. alpha is chosen per layer
by the output error of the quantized layer on calibration rows (deepcompressor's smooth
calibrator searches the same grid).
"""
from __future__ import annotations

import logging

import torch

from ..kernels import numerics
from .lowrank import low_rank
from .parallel import map_candidates

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0
_MIN_SCALE = 1e-5  # s >= 1e-5, so that 1 / s stays finite in fp32


def smooth_scales(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) (SVDQuant arXiv 2411.05007 eq. 4), fp32 [K].

    ``x_absmax`` [K] is max |x_j| of the quantized input, that is of x + shift for an unsigned
    layer (:meth:`InputStats.absmax_shifted`). Channels where either maximum is 0 (never active,
    or a zero weight column) or where the power is not finite get s_j = 1: their scale does not
    change the layer's output, and 1 keeps 1 / s harmless if the channel wakes up at inference.
    The rest is clamped to >= 1e-5.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_scales: alpha must lie in [0, 1], got {alpha}")
    xa = x_absmax.float().to(w.device)
    wa = w.float().abs().amax(0)
    if xa.shape != wa.shape:
        raise ValueError(f"smooth_scales: x_absmax has {xa.numel()} channels, the weight {wa.numel()}")
    s = xa.pow(alpha) / wa.pow(1.0 - alpha)
    ok = (xa > 0) & (wa > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp_min(_MIN_SCALE)


def layer_error(x_rows: torch.Tensor, p: numerics.W4A4Params, y_ref: torch.Tensor, bin_index: int = 0) -> float:
    """Sum of squared differences between the W4A4 forward (numerics) and ``y_ref``, in fp64."""
    y = numerics.w4a4_linear(x_rows, p, bin_index)
    return float((y.double() - y_ref.double()).square().sum())


def search_alpha(x_rows: torch.Tensor, w: torch.Tensor, x_absmax: torch.Tensor, *, rank: int,
                 alphas=DEFAULT_ALPHAS, unsigned: bool = False):
    """Grid search of the smoothing exponent by layer output error (SVDQuant arXiv 2411.05007 sec. 4.1).

    For each alpha, builds the RTN W4A4 layer of numerics exactly as the final one will be built
    - ``numerics.from_float(w, smooth=s, lr_down=L1, lr_up=L2, act_unsigned=unsigned)`` with the
    rank-``rank`` branch of :func:`low_rank` - and scores sum ||y - x W^T||^2 over ``x_rows``
    [T, K] (raw layer inputs, no bias on either side: from_float's shift correction cancels the
    shift of unsigned layers). ``x_absmax`` as in :func:`smooth_scales`.

    Returns (alpha, s) with the smallest error; ties go to the earlier alpha of the grid.
    Every alpha of the grid is tried, so the result never loses to any of them on ``x_rows``.
    """
    if x_rows.ndim != 2 or x_rows.shape[0] == 0:
        raise ValueError(f"search_alpha: need a non-empty [T, K] block of input rows, got {tuple(x_rows.shape)}")
    if not alphas:
        raise ValueError("search_alpha: empty alpha grid")
    w = w.float()
    x = x_rows.to(w.device)
    y_ref = x.float() @ w.T

    def score(alpha):
        s = smooth_scales(x_absmax, w, float(alpha))
        l1, l2 = low_rank(w * s[None, :], rank)
        p = numerics.from_float(w, smooth=s, lr_down=l1, lr_up=l2, act_unsigned=unsigned)
        return layer_error(x, p, y_ref), s

    best = None
    for alpha, (err, s) in zip(alphas, map_candidates(score, alphas, w.device)):
        log.debug("alpha %.2f: output error %.6g", alpha, err)
        if best is None or err < best[0]:
            best = (err, float(alpha), s)
    return best[1], best[2]
