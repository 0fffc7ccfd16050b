"""The calibration benchmark's extrapolation to all blocks (benchmarks/wan_e2e/calib.py): passes run
every block when they record and up to their last block when they replay, and the seconds per pass are
a line fitted to the measured passes."""
from __future__ import annotations

import pytest
from test_bench_e2e import _bench


def test_blocks_run_per_pass():
    calib = _bench("calib")
    # the last blocks' pass first: it records (all 40 blocks); the others stop after their last block
    assert calib.blocks_run([[36, 37, 38, 39], [0, 1, 2, 3, 4, 5], [6, 7]], 40) == [40, 6, 8]
    assert calib.blocks_run([[1], [0]], 40) == [40, 1]  # blocks 2..39 kept BF16: the first pass still runs all


def test_capture_line_through_the_measured_passes():
    calib = _bench("calib")
    fixed, per_block, how = calib.capture_model([40, 2], [43.874, 5.542])  # the H200's fp8_scaled run
    assert (round(fixed, 3), round(per_block, 4)) == (3.525, 1.0087) and "least-squares" in how
    assert fixed + per_block * 40 == pytest.approx(43.874) and fixed + per_block * 2 == pytest.approx(5.542)
    assert calib.capture_model([40], [40.0]) == (0.0, 1.0, "proportional to blocks run (lower bound)")
    assert calib.capture_model([40, 1], [None, None])[2] == "no pass measured"
