"""The calibration node on the tiny experts: writes a state per expert and returns patched models;
Cancel (ComfyUI's interrupt flag, as the UI's button sets it) stops it with no file left behind."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

# Small enough for a CPU test: 4 steps (2 per expert), 2 bins, no low-rank branch, one alpha, two clips.
FAST = dict(seed=0, runs=1, steps=4, cfg=3.5, shift=8.0, boundary=900.0, bins=2, rank=0,
            clip_grid="1.0, 0.8", clip_policy="per_bin", gptq=False, rows_per_bin=16, alphas="0.5")


def test_calibrate_writes_states_and_returns_patched_models(env):
    node = env.node("WanW4A4Calibrate")
    out = node.calibrate(env.unet("high"), env.unet("low"), env.positive, env.negative, env.latent,
                         name="calib_ok", overwrite=True, **FAST)
    high, low, report = out["result"]
    for expert in ("high", "low"):
        assert (env.w4a4_dir / f"calib_ok_{expert}.safetensors").is_file()
    assert (env.w4a4_dir / "calib_ok_report.json").is_file()
    assert "high expert: 20 layers" in report and "low expert: 20 layers" in report
    assert "calib_ok_high.safetensors" in env.node("WanW4A4ApplyState").INPUT_TYPES()["required"]["state_name"][0]
    # The returned models are the experts in W4A4 and sample.
    assert sum(k.startswith("diffusion_model.blocks.") for k in high.object_patches) == 20
    mid, final = env.two_expert(env.shifted(high), env.shifted(low), steps=2)
    assert torch.isfinite(final).all()
    # Inspect finds the report beside the states and shows per-layer errors.
    text = env.node("WanW4A4InspectState").inspect("calib_ok_high.safetensors", "calib_ok_low.safetensors")["result"][1]
    assert text.count("layer output SQNR vs BF16") == 2 and "plain RTN W4A4" in text
    with pytest.raises(FileExistsError):
        node.calibrate(env.unet("high"), env.unet("low"), env.positive, env.negative, env.latent,
                       name="calib_ok", overwrite=False, **FAST)


def test_cancel_leaves_no_file(env):
    import comfy.model_management
    import comfy.utils

    ticks = []

    def press_cancel_after_two_updates(value, total, preview, node_id=None):
        ticks.append(value)
        if len(ticks) == 2:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(press_cancel_after_two_updates)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            env.node("WanW4A4Calibrate").calibrate(env.unet("high"), env.unet("low"), env.positive, env.negative,
                                                   env.latent, name="calib_cancel", overwrite=False, **FAST)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert len(ticks) >= 2
    assert not list(env.w4a4_dir.glob("calib_cancel*")), "a cancelled calibration left files behind"
    assert not list(env.w4a4_dir.glob(".calib_cancel*")), "a cancelled calibration left temporary files"
