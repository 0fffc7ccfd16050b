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


def test_handover_by_step_covers_the_workflows_timesteps(env, caplog):
    """handover 'step': a workflow handing over after step 3 of 4 at shift 8 runs the high expert at
    t = 1000, 960, 889, below the 900 the default boundary would calibrate it for. The states made
    with that hand-over cover every timestep each expert runs at, so sampling it warns of nothing."""
    import logging
    from wan_w4a4.nodes.hook import get_hook

    spec = env.node("WanW4A4Calibrate").INPUT_TYPES()["optional"]
    assert spec["handover"][0] == ["boundary", "step"] and spec["handover"][1]["default"] == "boundary"
    assert "simple" in spec["scheduler"][0] and "euler" in spec["sampler_name"][0]
    out = env.node("WanW4A4Calibrate").calibrate(
        env.unet("high"), env.unet("low"), env.positive, env.negative, env.latent, name="calib_step",
        overwrite=True, **{**FAST, "handover": "step", "handover_step": 3, "scheduler": "simple"})
    high, low, report = out["result"]
    assert "calibrated for: hand-over at step 3 of 4" in report and "shift 8" in report
    hooks = [get_hook(high), get_hook(low)]
    for h in hooks:
        h.records.clear()
    with caplog.at_level(logging.WARNING):
        env.two_expert(env.shifted(high), env.shifted(low), steps=4, split=3)
    assert [round(r.t) for r in hooks[0].records] == [1000, 960, 889] and len(hooks[1].records) == 1
    assert all(r.in_range for h in hooks for r in h.records)
    assert not [r for r in caplog.records if "outside its calibrated range" in r.getMessage()]
