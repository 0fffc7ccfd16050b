"""calibration/parallel.py: candidate searches on two CPU threads give the serial loop's bits."""
from __future__ import annotations

import threading

import pytest
import torch

from wan_w4a4.calibration import parallel, smoothing
from wan_w4a4.calibration.clip import ClipEvaluator, DEFAULT_CLIP_GRID, search_clip
from wan_w4a4.calibration.smoothing import search_alpha
from wan_w4a4.kernels import numerics

N, K = 96, 256


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(seed=0, t=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, K, generator=g)
    x[:, :6] *= 40.0  # outlier channels, as in diffusion transformers
    return x, torch.randn(N, K, generator=g) * 0.05


def test_workers_only_on_a_cpu_with_one_torch_thread(monkeypatch, one_thread):
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 8)
    assert parallel.workers("cpu") == parallel.CPU_WORKERS == 2
    assert parallel.workers("cuda") == 1 and parallel.workers(torch.device("cuda", 1)) == 1
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 1)
    assert parallel.workers("cpu") == 1
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a distributed run
    assert parallel.workers("cpu") == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parallel.workers("cpu") == 2
    torch.set_num_threads(2)  # torch's own threads already use the cores
    assert parallel.workers("cpu") == 1


def test_map_candidates_keeps_the_order_and_runs_on_the_pool(monkeypatch, one_thread):
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    names = []

    def fn(i):
        names.append(threading.current_thread().name)
        return i * i

    assert parallel.map_candidates(fn, range(7), "cpu") == [i * i for i in range(7)]
    assert all(n.startswith("wan_w4a4-candidates") for n in names)
    names.clear()
    monkeypatch.setattr(parallel, "workers", lambda device: 1)
    assert parallel.map_candidates(fn, range(7), "cpu") == [i * i for i in range(7)]
    assert names == [threading.current_thread().name] * 7


@pytest.mark.parametrize("unsigned", [False, True])
def test_search_alpha_on_two_threads_is_the_serial_search_bit_for_bit(monkeypatch, one_thread, unsigned):
    x, w = _rows(seed=3)
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh") + 0.171875
    absmax = x.abs().amax(0)
    scored = []  # every candidate's output error, exactly as the search compares them

    def layer_error(*args, **kwargs):
        err = error_of(*args, **kwargs)
        scored.append(err)
        return err

    error_of = smoothing.layer_error
    monkeypatch.setattr(smoothing, "layer_error", layer_error)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    assert parallel.workers("cpu") == 2
    alpha2, s2 = search_alpha(x, w, absmax, rank=16, unsigned=unsigned)
    errors2, scored[:] = sorted(scored), []  # the two threads finish in either order
    monkeypatch.setattr(parallel, "workers", lambda device: 1)
    alpha1, s1 = search_alpha(x, w, absmax, rank=16, unsigned=unsigned)
    assert sorted(scored) == errors2 and len(set(errors2)) > 1
    assert alpha2 == alpha1 and torch.equal(s2, s1)


def test_clip_errors_on_two_threads_are_the_serial_errors_bit_for_bit(monkeypatch, one_thread):
    x, w = _rows(seed=4)
    p = numerics.from_float(w, torch.randn(N), smooth=x.abs().amax(0).sqrt().clamp_min(1e-5))
    y_ref = x @ w.T
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    ev = ClipEvaluator(x, p, y_ref)
    errors = ev.errors(DEFAULT_CLIP_GRID)
    assert errors == [ev.error(float(c)) for c in DEFAULT_CLIP_GRID]
    assert len(set(errors)) > 1  # the grid's candidates differ: the comparison is not of equal constants
    best, table = search_clip(x, p, y_ref)
    assert list(table.values()) == errors and best == min(table, key=lambda c: (table[c], -c))
