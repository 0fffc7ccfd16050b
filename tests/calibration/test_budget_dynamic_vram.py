"""The GPU budget under ComfyUI's dynamic VRAM (``calibration/budget.py``): comfy-aimdo's streamed
weights are bound only by the headroom it keeps free on the device, so the budget becomes that
headroom where calibration starts ComfyUI (``apps/runtime.py``), and a running ComfyUI whose headroom is
smaller gets a warning that names the option to start it with. (On the GPU: benchmarks/RESULTS.md.)"""
from __future__ import annotations

import logging
import sys
import types

import pytest
from wan_w4a4.calibration import CalibrationConfig, budget

GiB = 2**30


def test_headroom_leaves_the_budget_for_the_whole_process():
    assert budget.dynamic_vram_headroom(140 * GiB, 24) == 116 * GiB
    assert budget.dynamic_vram_headroom(int(23.5 * GiB), 22.0) == int(1.5 * GiB)
    assert budget.dynamic_vram_headroom(16 * GiB, 24) == 0  # a budget over the device binds nothing


@pytest.mark.parametrize(("aimdo", "headroom", "warns"), [(True, 0.0, True), (True, 116.0, False),
                                                           (True, 115.9, True), (False, 0.0, False)])
def test_a_smaller_headroom_is_named_with_the_option_that_fixes_it(monkeypatch, caplog, aimdo, headroom, warns):
    monkeypatch.setitem(sys.modules, "comfy.memory_management", types.SimpleNamespace(aimdo_enabled=aimdo))
    monkeypatch.setitem(sys.modules, "comfy.cli_args",
                        types.SimpleNamespace(args=types.SimpleNamespace(vram_headroom=headroom)))
    with caplog.at_level(logging.WARNING, logger=budget.log.name):
        budget._warn_unbounded_dynamic_vram(CalibrationConfig(gpu_budget_gib=24), 140 * GiB)
    assert ("--vram-headroom 116.0" in caplog.text) is warns, caplog.text
