"""``python -m wan_w4a4 demo`` end to end on the trained mini model, with the --quick budget
(1 calibration item, 2 + 2 calibration steps, 2 bins, 1 held-out pair sampled with 4 steps; ~20 s on CPU).

Tolerances come from measured runs of exactly this configuration (CPU, 1 thread, 2026-11-21):
PSNR 31.7 dB, SSIM 0.913, latent relative error 0.159, mean velocity SQNR 20.8 dB against BF16. The
bounds leave room for thread-count and platform rounding differences while still failing if W4A4 were
broken (RTN W4A4 without any of the method, on the benchmark's 8-step setting: 27.0 dB / 0.876 /
0.238 / 15.4 dB) or if it silently ran BF16 (relative error 0, PSNR inf).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from wan_w4a4.__main__ import main
from wan_w4a4.minimodel import demo, fidelity


def test_metrics_basics():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, 3, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert fidelity.psnr(a, a) == math.inf and fidelity.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert 20 < fidelity.psnr(a, b) < 30  # noise std 0.05 -> ~26 dB before clamping
    assert 0 < fidelity.ssim(a, b) < 1
    assert fidelity.rel_err(a, a) == 0 and fidelity.rel_err(a, b) > 0


def test_demo_refuses_missing_comfyui(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "no_comfyui_here"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "ComfyUI not found" in err and "COMFYUI_PATH" in err


@pytest.mark.comfyui
def test_demo_quick_end_to_end(comfy_nodes, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for f in demo.FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    row = [line for line in printed.splitlines() if line.startswith("| 1 | 4 |")]
    assert len(row) == 1, printed
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    psnr, ssim, rel, vsqnr = (float(c) for c in cells[2:6])
    assert all(math.isfinite(x) for x in (psnr, ssim, rel, vsqnr))

    s = json.loads((out / "demo.json").read_text())["summary"]
    assert s["psnr_db"] == pytest.approx(psnr, abs=0.01)
    # W4A4 differs from BF16 ...
    assert s["latent_rel_err"] > 1e-3 and s["psnr_db"] < 60
    # ... but stays close (measured 0.159 / 31.7 dB / 0.913 / 20.8 dB)
    assert s["latent_rel_err"] < 0.25
    assert s["psnr_db"] > 27.0
    assert s["ssim"] > 0.85
    assert s["velocity_sqnr_db"] > 17.0
    # 4-bit values + scales + rank-32 branch on 256-wide layers: about half of BF16 (0.491 measured)
    assert 0.3 < s["memory_ratio"] < 0.6

    # no silent overwrite; --overwrite replaces
    assert main(["demo", "--quick", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
