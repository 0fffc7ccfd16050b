"""calibration/smoothing.py: the SVDQuant scale formula, and the alpha search beating its alternatives."""
from __future__ import annotations

import pytest
import torch

from wan_w4a4.calibration.lowrank import low_rank
from wan_w4a4.calibration.smoothing import layer_error, search_alpha, smooth_scales
from wan_w4a4.kernels import numerics

N, K = 96, 256


def _layer(seed=0, t=512):
    """Inputs with a few outlier channels (x40, as in diffusion transformers) and a plain weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * t, K, generator=g)
    x[:, :6] *= 40.0
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g) * 0.1
    return x[:t], x[t:], w, b  # calibration rows, held-out rows


def test_smooth_scales_formula_and_degenerate_channels():
    g = torch.Generator().manual_seed(1)
    xa = torch.rand(K, generator=g) * 10 + 0.1
    w = torch.randn(N, K, generator=g)
    xa[5] = 0.0  # a channel that was never active
    w[:, 9] = 0.0  # a zero weight column
    s = smooth_scales(xa, w, 0.5)
    ref = xa.sqrt() / w.abs().amax(0).sqrt()
    keep = torch.ones(K, dtype=torch.bool)
    keep[[5, 9]] = False
    torch.testing.assert_close(s[keep], ref[keep], rtol=1e-6, atol=0)
    assert s[5] == 1.0 and s[9] == 1.0 and bool(torch.isfinite(s).all())
    torch.testing.assert_close(smooth_scales(xa, w, 1.0)[keep], xa[keep])  # alpha = 1: s = max|x|
    tiny = smooth_scales(torch.full((K,), 1e-30), w, 1.0)
    assert bool(tiny.min() >= 1e-5)  # clamped, so 1 / s stays finite
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(xa, w, 1.5)
    with pytest.raises(ValueError, match="channels"):
        smooth_scales(xa[:-1], w, 0.5)


def test_smoothing_and_low_rank_beat_plain_w4a4_on_outlier_channels():
    x, x_test, w, b = _layer()
    y_test = x_test @ w.T + b
    plain = numerics.from_float(w, b)
    alpha, s = search_alpha(x, w, x.abs().amax(0), rank=16)
    l1, l2 = low_rank(w * s, 16)
    svdq = numerics.from_float(w, b, smooth=s, lr_down=l1, lr_up=l2)
    db_plain = numerics.sqnr_db(y_test, numerics.w4a4_linear(x_test, plain))
    db_svdq = numerics.sqnr_db(y_test, numerics.w4a4_linear(x_test, svdq))
    # Held-out rows. Measured: plain 17.1 dB, smoothing + rank 16 34.0 dB (alpha 1.0).
    assert db_svdq > db_plain + 10.0, (db_plain, db_svdq, alpha)


@pytest.mark.parametrize("rank", [0, 16])
def test_alpha_search_beats_alpha_zero_and_never_loses(rank):
    x, _, w, _ = _layer(seed=2)
    xa = x.abs().amax(0)
    y = x @ w.T

    def error(a):
        s = smooth_scales(xa, w, a)
        l1, l2 = low_rank(w * s, rank)
        return layer_error(x, numerics.from_float(w, smooth=s, lr_down=l1, lr_up=l2), y)

    alpha, s = search_alpha(x, w, xa, rank=rank)
    torch.testing.assert_close(s, smooth_scales(xa, w, alpha))
    errors = {a: error(a) for a in (0.0, 0.3, 0.5, 0.7, 1.0)}
    assert error(alpha) <= min(errors.values())  # never loses to any alpha of the grid
    # Measured error ratio to alpha = 0: rank 0: 0.69 (alpha 0.5); rank 16: 0.033 (alpha 1.0).
    assert error(alpha) < 0.8 * errors[0.0], (alpha, errors)


def test_alpha_search_on_an_unsigned_layer():
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.gelu(torch.randn(1024, K, generator=g) * 2.0, approximate="tanh")
    x[:, :4] *= 30.0  # post-GELU outliers are positive
    w = torch.randn(N, K, generator=g) * 0.05
    xa = (x + numerics.GELU_SHIFT).abs().amax(0)  # what InputStats.absmax_shifted gives
    alpha, s = search_alpha(x[:512], w, xa, rank=8, unsigned=True)
    l1, l2 = low_rank(w * s, 8)
    p = numerics.from_float(w, smooth=s, lr_down=l1, lr_up=l2, act_unsigned=True)
    plain = numerics.from_float(w, act_unsigned=True)
    y = x[512:] @ w.T
    db, db_plain = (numerics.sqnr_db(y, numerics.w4a4_linear(x[512:], q)) for q in (p, plain))
    # Held-out rows. Measured: plain unsigned 16.7 dB, smoothing + rank 8 30.1 dB (alpha 1.0).
    assert db > db_plain + 8.0, (db_plain, db, alpha)


def test_alpha_search_rejects_empty_rows():
    _, _, w, _ = _layer()
    with pytest.raises(ValueError, match="non-empty"):
        search_alpha(torch.zeros(0, K), w, torch.ones(K), rank=4)
