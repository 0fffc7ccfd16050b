"""calibration/clip.py: the clip search runs numerics' exact forward and finds c < 1 where it pays."""
from __future__ import annotations

import pytest
import torch

from wan_w4a4.calibration.clip import DEFAULT_CLIP_GRID, ClipEvaluator, best_clip, combine_errors, search_clip
from wan_w4a4.calibration import config
from wan_w4a4.calibration.lowrank import low_rank
from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics

N, K, T = 64, 256, 256


def _weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g) * 0.1


def _laplace(t, scale=1.0, seed=0):
    """Heavy-tailed activations: each token's largest values are isolated outliers."""
    u = torch.rand(t, K, generator=torch.Generator().manual_seed(seed)) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


def _plateau(t, level=0.5, seed=0):
    """Light-tailed activations: every value sits at +-level, where any clipping only hurts."""
    return level * torch.sign(torch.randn(t, K, generator=torch.Generator().manual_seed(seed)))


def test_default_grid():
    assert DEFAULT_CLIP_GRID == (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    assert config.DEFAULT_CLIPS is DEFAULT_CLIP_GRID  # one definition; the config and the node show it


def test_clip_policy_names_map_to_the_state_header():
    # The CLI and node spell policies with underscores, a state's header with hyphens (format.CLIP_POLICIES).
    assert config.CLIP_POLICIES == ("per_bin", "per_expert", "global")
    assert config.CLIP_POLICY_HEADER == {"per_bin": "per-bin", "per_expert": "per-expert", "global": "global"}
    assert set(config.CLIP_POLICY_HEADER.values()) <= set(fmt.CLIP_POLICIES)


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluator_is_the_exact_w4a4_forward(unsigned, dtype):
    w, b = _weight()
    x = _laplace(T, seed=1)
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    x = x.to(dtype)
    s = torch.rand(K, generator=torch.Generator().manual_seed(2)) + 0.5
    l1, l2 = low_rank(w * s, 8)
    p = numerics.from_float(w, b, smooth=s, lr_down=l1, lr_up=l2, act_unsigned=unsigned)
    y_ref = (x.float() @ w.T + b).to(dtype)
    ev = ClipEvaluator(x, p, y_ref)
    for c in (1.0, 0.8, 0.55):
        pc = numerics.from_float(w, b, smooth=s, lr_down=l1, lr_up=l2, act_unsigned=unsigned,
                                 clip=torch.tensor([c]))
        y = numerics.w4a4_linear(x, pc)
        assert torch.equal(ev.output(c), y)  # bit for bit: rtol = atol = 0
        assert ev.error(c) == float((y.double() - y_ref.double()).square().sum())


def test_search_returns_c_below_one_on_heavy_tailed_activations():
    w, b = _weight()
    x = _laplace(T, seed=3)
    p = numerics.from_float(w, b)
    c, errors = search_clip(x, p, x @ w.T + b)
    assert set(errors) == set(DEFAULT_CLIP_GRID)
    # Measured: c = 0.85, error 0.89x that of c = 1.
    assert c < 1.0 and errors[c] < 0.95 * errors[1.0], (c, errors)
    # ... and c = 1 where clipping can only hurt (measured: every c < 1 at least 1.20x worse; the
    # weight's own 4-bit error is the rest).
    xp = _plateau(T, seed=3)
    c, errors = search_clip(xp, p, xp @ w.T + b)
    assert c == 1.0, errors


def test_per_bin_search_beats_one_global_ratio_when_ranges_differ_by_bin():
    # Two timestep bins whose activations differ: one heavy-tailed (per-token range ~6), one flat
    # (range 1). One ratio for both must compromise; a ratio per bin need not.
    w, b = _weight(1)
    p = numerics.from_float(w, b)
    bins = [_laplace(T, scale=1.0, seed=4), _plateau(T, level=1.0, seed=5)]
    per_bin = [search_clip(x, p, x @ w.T + b) for x in bins]
    chosen = [c for c, _ in per_bin]
    pooled = combine_errors(*(e for _, e in per_bin))
    c_global = best_clip(pooled)
    err_per_bin = sum(e[c] for c, e in per_bin)
    # Measured: per-bin c = (0.85, 1.0), global c = 0.9, per-bin error 0.91x the global one.
    assert chosen[0] < 1.0 and chosen[1] == 1.0, chosen
    assert err_per_bin < 0.95 * pooled[c_global], (chosen, c_global, err_per_bin, pooled[c_global])
    # The pooled dict is the error of one shared c over all rows.
    x_all = torch.cat(bins)
    pooled_error = ClipEvaluator(x_all, p, x_all @ w.T + b).error(c_global)
    assert abs(pooled_error - pooled[c_global]) <= 1e-9 * pooled[c_global]


def test_best_clip_and_combine():
    assert best_clip({1.0: 2.0, 0.9: 1.0, 0.8: 1.0}) == 0.9  # ties go to less clipping
    assert combine_errors({1.0: 1.0, 0.5: 3.0}, {1.0: 4.0, 0.5: 1.0}) == {1.0: 5.0, 0.5: 4.0}
    with pytest.raises(ValueError, match="different grids"):
        combine_errors({1.0: 1.0}, {0.9: 1.0})
    with pytest.raises(ValueError, match="no candidates"):
        best_clip({})


def test_bad_rows():
    w, b = _weight()
    p = numerics.from_float(w, b)
    with pytest.raises(ValueError, match="no input rows"):
        search_clip(torch.zeros(0, K), p, torch.zeros(0, N))
    with pytest.raises(ValueError, match="x_rows must be"):
        search_clip(torch.zeros(4, K + 1), p, torch.zeros(4, N))
    with pytest.raises(ValueError, match="y_ref must be"):
        search_clip(torch.zeros(4, K), p, torch.zeros(5, N))
    with pytest.raises(ValueError, match="empty grid"):
        search_clip(torch.zeros(4, K), p, torch.zeros(4, N), grid=())


@pytest.mark.gpu
def test_cuda_int8_path_is_the_exact_forward():
    w, b = _weight()
    x = _laplace(T, seed=6).bfloat16()
    p = numerics.from_float(w, b)
    y_ref = x.float() @ w.T + b
    ev = ClipEvaluator(x.cuda(), p.to("cuda"), y_ref.cuda())
    for c in (1.0, 0.7):
        p.clip = torch.tensor([c])
        assert torch.equal(ev.output(c).cpu(), numerics.w4a4_linear(x, p))
