"""The calibration node on the tiny experts: writes a state per expert and returns patched models;
Cancel (ComfyUI's interrupt flag, as the UI's button sets it) stops it with no file left behind."""
from __future__ import annotations

import re

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
    figures = re.findall(r"(\S+) dB", report)
    assert len(figures) == 4 and all(re.fullmatch(r"-?\d+\.\d\d|-?inf|None", f) for f in figures), report
    assert "calib_ok_high.safetensors" in env.node("WanW4A4ApplyState").INPUT_TYPES()["required"]["state_name"][0]
    # The returned models are the experts in W4A4 and sample.
    assert sum(k.startswith("diffusion_model.blocks.") and not k.endswith(".ffn") for k in high.object_patches) == 20
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
    # What finished before the cancel may wait in the hidden work folder (calibration/resume.py), never as a
    # state; queueing the same node again finishes the run and removes it.
    left = [p.name for p in env.w4a4_dir.glob(".calib_cancel*")]
    assert left in ([], [".calib_cancel.w4a4-work"]), left
    env.node("WanW4A4Calibrate").calibrate(env.unet("high"), env.unet("low"), env.positive, env.negative,
                                           env.latent, name="calib_cancel", overwrite=False, **FAST)
    assert sorted(p.name for p in env.w4a4_dir.glob("*calib_cancel*")) == [
        "calib_cancel_high.safetensors", "calib_cancel_low.safetensors", "calib_cancel_report.json"]


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


def test_calibrate_after_apply_on_the_same_cached_experts(env):
    """A server run caches UNETLoader's MODELs: a W4A4 workflow (Apply + sampling) on them leaves its
    clone loaded, with its W4A4 layers in the model every clone shares. Calibrating those same BF16
    experts afterwards must see and run the BF16 Linears (and so give the state of a fresh load)."""
    from wan_w4a4.kernels import format as fmt

    high, low = env.unet("high"), env.unet("low")
    env.two_expert(env.shifted(env.apply(high, "tiny_high.safetensors")),
                   env.shifted(env.apply(low, "tiny_low.safetensors")), steps=2)
    node = env.node("WanW4A4Calibrate")
    node.calibrate(high, low, env.positive, env.negative, env.latent, name="calib_after_apply", overwrite=True,
                   **FAST)
    node.calibrate(env.unet("high"), env.unet("low"), env.positive, env.negative, env.latent,
                   name="calib_fresh", overwrite=True, **FAST)
    for expert in ("high", "low"):
        after, meta_after = fmt.load_state(str(env.w4a4_dir / f"calib_after_apply_{expert}.safetensors"))
        fresh, meta_fresh = fmt.load_state(str(env.w4a4_dir / f"calib_fresh_{expert}.safetensors"))
        assert meta_after.fingerprint == meta_fresh.fingerprint
        for name, p in fresh.items():
            assert torch.equal(after[name].qweight, p.qweight), f"{expert} {name}"


def _calibrate_counting_progress(env, high, low, name):
    """Run the node; returns (the exception it raised, progress updates before it)."""
    import comfy.utils

    ticks = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: ticks.append(value))
    try:
        with pytest.raises(Exception) as info:
            env.node("WanW4A4Calibrate").calibrate(high, low, env.positive, env.negative, env.latent, name=name,
                                                   overwrite=False, **FAST)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return info.value, ticks


def test_too_long_name_is_refused_before_any_work(env):
    """230 characters: a legal file name stem whose temporary file name (while writing) passes 255 bytes.
    Refused at once, saying the limit and the name's size; no sampling step, no file."""
    name = "n" * 230
    err, ticks = _calibrate_counting_progress(env, env.unet("high"), env.unet("low"), name)
    assert isinstance(err, ValueError) and "255 bytes" in str(err) and "it has 230 bytes" in str(err), err
    assert ticks == [], "the name was refused only after the calibration had started"
    assert not list(env.w4a4_dir.glob(f"*{name}*"))


def test_expert_with_a_lora_is_refused_before_any_work(env):
    """A LoRA before Calibrate: the state would hold the plain weights while sampling saw the LoRA'd ones,
    and Apply checks the plain ones. Refused before any sampling, naming the expert and a patched layer;
    no file is written."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    n, k = env.unet("high").model.diffusion_model.blocks[0].self_attn.q.weight.shape
    loras = env.models_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(n, 4, generator=g) * 0.1,
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, k, generator=g) * 0.1},
              str(loras / "calib_lora.safetensors"))
    (low,) = env.nodes.LoraLoaderModelOnly().load_lora_model_only(env.unet("low"), "calib_lora.safetensors", 1.0)
    err, ticks = _calibrate_counting_progress(env, env.unet("high"), low, "calib_lora")
    assert "the low-noise model carries weight patches" in str(err), err
    assert "diffusion_model.blocks.0.self_attn.q.weight" in str(err) and "Apply W4A4 state" in str(err)
    assert ticks == [], "the patched expert was refused only after the calibration had started"
    assert not list(env.w4a4_dir.glob("*calib_lora*"))


def test_seed_starts_fixed_where_comfyui_lets_a_node_declare_it(env):
    # A fresh Calibrate node must not randomize its seed after each Run (each Run would recalibrate).
    from comfy_api.latest import _io as io
    seed = env.node("WanW4A4Calibrate").INPUT_TYPES()["required"]["seed"][1]
    if hasattr(io, "ControlAfterGenerate"):  # ComfyUI 0.33
        assert seed["control_after_generate"] == "fixed"
    else:  # ComfyUI 0.3.64: only a bool is valid there; its frontend's default for "seed" stays
        assert "control_after_generate" not in seed


def test_report_figures_have_two_decimals(env):
    from wan_w4a4.nodes.calibrate_node import db_text
    assert db_text(18.287869647479194) == "18.29" and db_text(-3) == "-3.00"
    assert db_text("inf") == "inf" and db_text(None) == "None"
