"""Calibration names: the longest name CalibrationConfig accepts is written by the real writers (states
through kernels/format.py, the report through report.write_json, each under a temporary name first);
one byte more is refused on construction."""
from __future__ import annotations

import pytest
import torch

from wan_w4a4.calibration import report as rpt
from wan_w4a4.calibration.config import NAME_MAX, CalibrationConfig, output_names
from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm


def longest_name() -> str:
    n = NAME_MAX
    while True:  # the first length the config accepts, counting down from the limit
        try:
            CalibrationConfig(name="é" * (n // 2) + "n" * (n % 2))  # 2-byte characters: bytes count, not characters
            return "é" * (n // 2) + "n" * (n % 2)
        except ValueError as e:
            assert f"it has {n} bytes" in str(e) and f"{NAME_MAX} bytes" in str(e)
            n -= 1


def test_longest_accepted_name_is_written(tmp_path):
    name = longest_name()
    files = output_names(name)
    p = nm.from_float(torch.randn(8, 128), None)
    meta = fmt.StateMeta(expert="high", bin_edges=(1000.0, 900.0), clip_policy="per-bin", fingerprint="")
    fmt.save_state(tmp_path / files["high"], {"blocks.0.ffn.0": p}, meta)
    rpt.write_json(tmp_path / files["report"], {"ok": True})
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([files["high"], files["report"]])
    with pytest.raises(ValueError, match=r"use a name of at most \d+ bytes"):
        CalibrationConfig(name=name + "n")
