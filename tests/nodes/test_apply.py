"""Apply W4A4 state on the tiny experts in a real ComfyUI (CPU): output, hook log, model unchanged."""
from __future__ import annotations

import gc
import logging
import warnings

import pytest
import torch

from wan_w4a4.nodes.quant_layout import no_dense_weight

from wan_w4a4.kernels import numerics as nm
from wan_w4a4.nodes.hook import HOOK_KEY

from w4a4_testlib import BOUNDARY, EDGES, SEED

pytestmark = pytest.mark.comfyui

# RTN W4A4 (no smoothing, no low-rank branch) on a random tiny expert, 4 steps: the final latent
# stays within this SQNR of the BF16 one. Measured ~29 dB (model-output level ~22 dB, see below);
# the floors leave margin for other CPUs' float rounding, and a broken layer gives < 5 dB.
LATENT_SQNR_FLOOR_DB = 20.0
PREDICTION_SQNR_FLOOR_DB = 15.0


def hook(model):
    import comfy.patcher_extension as pe
    (w,) = model.get_wrappers(pe.WrappersMP.APPLY_MODEL, HOOK_KEY)
    return w


def expected_calls(model, steps, scheduler, start, end, shift_edges):
    """(t, bin) per sampling step of steps[start:end], from ComfyUI's own sigmas. The bin is computed
    here on purpose, not by numerics.bin_of: an independent oracle of the rule (edges[i+1] <= t < edges[i])."""
    import comfy.samplers
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)[start:end]
    out = []
    for s in sigmas.tolist():
        t = float(ms.timestep(torch.tensor([s]))[0])
        b = next((i for i, low in enumerate(shift_edges[1:]) if t >= low), len(shift_edges) - 2)
        out.append((t, b))
    return out


@pytest.mark.slow
def test_w4a4_close_to_bf16_and_not_identical(env):
    bf16 = {e: env.shifted(env.unet(e)) for e in ("high", "low")}
    w4a4 = {e: env.shifted(env.apply(env.unet(e), f"tiny_{e}.safetensors")) for e in ("high", "low")}
    _, ref = env.two_expert(bf16["high"], bf16["low"])
    _, out = env.two_expert(w4a4["high"], w4a4["low"])
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref), "W4A4 output is bit-identical to BF16: the patch did not take effect"
    assert nm.sqnr_db(ref, out) > LATENT_SQNR_FLOOR_DB

    # One model call at the first sigma, through the same ModelPatcher machinery.
    import comfy.model_management
    x = torch.randn(2, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0, 1.0])
    ctx = env.positive[0][0].repeat(2, 1, 1)
    concat = torch.zeros(2, 20, 2, 8, 8)
    preds = []
    for m in (bf16["high"], w4a4["high"]):
        comfy.model_management.load_models_gpu([m])
        preds.append(m.model.apply_model(x, sigma, c_concat=concat, c_crossattn=ctx).float())
    assert not torch.equal(preds[0], preds[1])
    assert nm.sqnr_db(preds[0] - x, preds[1] - x) > PREDICTION_SQNR_FLOOR_DB


def test_input_model_unchanged(env):
    base = env.unet("high")
    q = env.node("WanW4A4ApplyState").apply(base, "tiny_high.safetensors")[0]
    assert q is not base and q.model is base.model  # a clone sharing the BF16 weights
    assert not base.object_patches and not base.get_wrappers("apply_model", HOOK_KEY)
    assert type(base.model.diffusion_model.blocks[0].self_attn.q).__name__ == "Linear"
    layers = [k for k in q.object_patches if k.startswith("diffusion_model.blocks.") and not k.endswith(".ffn")]
    assert len(layers) == 20  # + one in-place-GELU FFN per block (nodes/ffn.py, tests/nodes/test_ffn.py)
    assert q.model_size() < base.model_size()


def test_apply_again_while_another_w4a4_clone_is_loaded(env):
    """Two states on one UNETLoader output (a state changed between runs, or BF16 and W4A4 side by
    side): while the first W4A4 clone is loaded its layers sit in the shared modules, and the second
    Apply must not take them for its own and refuse."""
    import comfy.model_management
    base = env.unet("high")
    apply = env.node("WanW4A4ApplyState").apply
    first = apply(base, "tiny_high.safetensors")[0]
    comfy.model_management.load_models_gpu([first])
    try:
        assert type(base.model.diffusion_model.blocks[0].self_attn.q).__name__ != "Linear"  # patched in place
        second = apply(base, "tiny_high.safetensors")[0]
        assert sum(k.startswith("diffusion_model.blocks.") and not k.endswith(".ffn") for k in second.object_patches) == 20
        with pytest.raises(Exception, match="already has W4A4 layers"):
            apply(first, "tiny_high.safetensors")  # a W4A4 model itself is still refused
        comfy.model_management.load_models_gpu([second])
    finally:
        comfy.model_management.unload_all_models()
    assert type(base.model.diffusion_model.blocks[0].self_attn.q).__name__ == "Linear"


def test_unloading_a_w4a4_model_frees_the_kernels_workspaces(env):
    """ComfyUI's unload (``ModelPatcher.detach``) frees what the kernels keep between layer calls, replay.py's
    resident workspaces and the recordings that point into them, with the model."""
    import sys

    import comfy.model_management
    import comfy.patcher_extension as pe

    model = env.node("WanW4A4ApplyState").apply(env.unet("high"), "tiny_high.safetensors")[0]
    (release,) = [f for f in model.get_all_callbacks(pe.CallbacksMP.ON_DETACH)
                  if f.__name__ == "release_kernel_workspaces"]
    kernels = sys.modules[release.__module__].kernels  # the pack as ComfyUI loaded it (tests import it apart)
    replay, why = kernels._lazy("replay")
    if replay is None:
        pytest.skip(why)
    comfy.model_management.load_models_gpu([model])
    try:
        replay._workspaces[(0, 0, 0)] = torch.empty(256, dtype=torch.uint8)  # as a few-token call leaves them
        replay._recordings[("a signature",)] = None
    finally:
        comfy.model_management.unload_all_models()
    assert replay._workspaces == {} and replay._recordings == {}


def test_a_dropped_w4a4_clone_leaves_the_loaded_models_workspaces(env):
    """A clone dropped while another is loaded (``ModelPatcher.__del__`` detaches it with ``unpatch_all`` False)
    frees nothing: the loaded model's calls still use the workspaces. The unload does."""
    import gc
    import sys

    import comfy.model_management
    import comfy.patcher_extension as pe

    base = env.unet("high")
    apply = env.node("WanW4A4ApplyState").apply
    model, dropped = apply(base, "tiny_high.safetensors")[0], apply(base, "tiny_high.safetensors")[0]
    (release,) = [f for f in model.get_all_callbacks(pe.CallbacksMP.ON_DETACH)
                  if f.__name__ == "release_kernel_workspaces"]
    kernels = sys.modules[release.__module__].kernels
    replay, why = kernels._lazy("replay")
    if replay is None:
        pytest.skip(why)
    comfy.model_management.load_models_gpu([model])
    try:
        replay._workspaces[(0, 0, 0)] = torch.empty(256, dtype=torch.uint8)
        detached = []
        dropped.add_callback(pe.CallbacksMP.ON_DETACH,
                             lambda patcher, unpatch_all=True, *a: detached.append(unpatch_all))
        del dropped
        gc.collect()
        assert detached == [False]  # it was detached, as a dropped clone
        assert list(replay._workspaces) == [(0, 0, 0)]
    finally:
        comfy.model_management.unload_all_models()
    assert replay._workspaces == {}


@pytest.mark.parametrize("steps,scheduler,shift,cfg", [
    (4, "simple", 8.0, 3.5), pytest.param(5, "beta", 5.0, 1.0, marks=pytest.mark.slow)])  # the second: W4A4 runs
def test_hook_log_matches_sigmas(env, steps, scheduler, shift, cfg):
    high = env.shifted(env.apply(env.unet("high"), "tiny_high.safetensors"), shift)
    low = env.shifted(env.apply(env.unet("low"), "tiny_low.safetensors"), shift)
    import comfy.samplers
    ms = high.get_model_object("model_sampling")
    ts = ms.timestep(comfy.samplers.calculate_sigmas(ms, scheduler, steps)[:-1])
    split = int((ts >= BOUNDARY).sum())
    assert 0 < split < steps
    hh, hl = hook(high), hook(low)
    hh.records.clear(), hl.records.clear()
    env.two_expert(high, low, steps=steps, cfg=cfg, scheduler=scheduler, split=split)

    batch = 1 if cfg == 1.0 else 2  # cfg 1 skips the uncond pass; otherwise cond+uncond in one batch
    for h, expert, start, end in ((hh, "high", 0, split), (hl, "low", split, steps)):
        want = expected_calls(high, steps, scheduler, start, end, EDGES[expert])
        got = [(r.t, r.bin) for r in h.records]
        assert [r.expert for r in h.records] == [expert] * len(want)
        assert [b for _, b in got] == [b for _, b in want], (expert, got, want)
        assert [t for t, _ in got] == pytest.approx([t for t, _ in want], abs=1e-3)
        assert all(r.in_range and r.batch == batch for r in h.records)
    assert hh.selector is not hl.selector


@pytest.mark.slow  # W4A4 two-expert runs
def test_out_of_range_uses_nearest_bin_and_warns_once(env, caplog):
    high = env.shifted(env.apply(env.unet("high"), "tiny_high.safetensors"))
    low = env.shifted(env.unet("low"))
    h = hook(high)
    h.records.clear()
    # The high expert runs 3 of 4 steps (t = 1000, 960, 889): the last is below its range [900, 1000].
    with caplog.at_level(logging.WARNING):
        env.two_expert(high, low, steps=4, split=3)
    assert [round(r.t) for r in h.records] == [1000, 960, 889]
    assert [r.bin for r in h.records] == [0, 1, 3]
    assert [r.in_range for r in h.records] == [True, True, False]
    warnings = [r for r in caplog.records if "outside its calibrated range" in r.getMessage()]
    assert len(warnings) == 1 and "tiny_high.safetensors" in warnings[0].getMessage()
    msg = warnings[0].getMessage()  # where, what the state covers, and the fix
    assert "step 2 (0-based) of the 3 steps this sampler runs with it is at model timestep 888.9" in msg
    assert "calibrated range t 900.0..1000.0" in msg and "nearest bin (3)" in msg
    assert "re-calibrate the states with this workflow's hand-over" in msg and "--handover-step N" in msg
    assert "calibrated for:" not in msg  # this state records no hand-over (made without calibration)


def test_out_of_range_message_quotes_the_calibrated_handover():
    from wan_w4a4.nodes.hook import out_of_range_message
    handover = {"by": "boundary", "boundary": 900.0, "high_steps": 8, "steps": 20, "shift": 5.0, "sampler": "euler",
                "scheduler": "simple"}
    msg = out_of_range_message("s_high.safetensors", "high", 859.375, 0.859375, (9, 10), (1000.0, 950.0, 900.0), 1,
                               handover)
    assert "step 9 (0-based) of the 10 steps" in msg and "model timestep 859.4 (sigma 0.8594)" in msg
    assert "calibrated for: expert switch at t = 900 (step 8 of 20), shift 5, euler/simple" in msg
    assert "a sampling step is at" in out_of_range_message("s", "low", 1.0, 0.001, None, (900.0, 0.0), 0, {})


@pytest.mark.slow  # W4A4 two-expert runs
def test_alongside_another_wrapper(env):
    import comfy.patcher_extension as pe
    seen = []

    def other(executor, x, t, *args, **kwargs):
        seen.append(float(t[0]))
        return executor(x, t, *args, **kwargs)

    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    high = high.clone()
    high.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "another_pack", other)
    high = env.shifted(high)
    hook(high).records.clear()
    env.two_expert(high, env.shifted(env.unet("low")), steps=2)
    assert len(seen) == len(hook(high).records) == 1
    assert [r.sigma for r in hook(high).records] == pytest.approx(seen)


@pytest.mark.slow  # two two-expert runs and two heap scans
def test_second_run_does_not_grow_memory(env):
    high = env.shifted(env.apply(env.unet("high"), "tiny_high.safetensors"))
    low = env.shifted(env.apply(env.unet("low"), "tiny_low.safetensors"))

    def held():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
            warnings.simplefilter("ignore")
            return sum(o.nelement() * o.element_size() for o in gc.get_objects()
                       if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta)

    env.two_expert(high, low, steps=2)
    first = held()
    env.two_expert(high, low, steps=2)
    assert held() <= first + 64 * 1024, "held tensors grew between identical runs"
    assert len(hook(high).records) == 2 and hook(high).run == 2


@pytest.mark.slow  # W4A4 two-expert runs
def test_partial_denoise_bins_by_timestep(env):
    """KSampler with denoise 0.5 (a video-to-video pass): the schedule starts mid-way, and the
    bins still follow the timesteps actually sampled."""
    import comfy.samplers
    low = env.shifted(env.apply(env.unet("low"), "tiny_low.safetensors"))
    h = hook(low)
    h.records.clear()
    steps, denoise = 3, 0.5
    env.nodes.KSampler().sample(low, SEED, steps, 3.5, "euler", "simple", env.positive, env.negative, env.latent,
                                denoise=denoise)
    ms = low.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", int(steps / denoise))[-(steps + 1):-1]
    want = [float(ms.timestep(s[None])[0]) for s in sigmas]
    assert [r.t for r in h.records] == pytest.approx(want, abs=1e-3)
    assert [r.bin for r in h.records] == [next(i for i, lo in enumerate(EDGES["low"][1:]) if t >= lo) for t in want]
    assert max(want) < BOUNDARY  # denoise 0.5 at shift 8 starts below the expert boundary


def test_weight_patch_on_w4a4_layer_fails_clearly(env):
    """A weight patch that cannot be folded into a W4A4 layer (a dense diff) is a clear error rather than
    silently dropped (ModelPatcher patches parameters, and a W4A4 layer has none). LoRAs fold: test_lora.py."""
    q = env.apply(env.unet("high"), "tiny_high.safetensors")
    layer = q.object_patches["diffusion_model.blocks.0.self_attn.q"]
    assert no_dense_weight(layer) and layer.qweight.dtype == torch.uint8
    lora = q.clone()
    assert lora.add_patches({"diffusion_model.blocks.0.self_attn.q.weight": ("diff", (torch.zeros(256, 256),))})
    with pytest.raises(ValueError, match="cannot apply a diff weight patch to W4A4 layer blocks.0.self_attn.q"):
        env.two_expert(env.shifted(lora), env.shifted(env.unet("low")), steps=2)


def sigma_at(ms, t: float, direction: float = 0.0) -> torch.Tensor:
    """A float32 sigma [1] whose model timestep (ComfyUI's own ``model_sampling.timestep``) is exactly
    ``t``; with ``direction`` +1 / -1, the next float32 sigma above / below that one."""
    s = torch.tensor([t / 1000.0], dtype=torch.float32)
    for _ in range(16):
        got = float(ms.timestep(s)[0])
        if got == t:
            break
        s = torch.nextafter(s, torch.tensor([1.0 if got < t else 0.0]))
    else:
        raise AssertionError(f"no float32 sigma has model timestep exactly {t}")
    if direction:
        s = torch.nextafter(s, torch.tensor([2.0 if direction > 0 else 0.0]))
    return s


def test_hook_bins_timesteps_on_and_beside_each_edge(env):
    """The bin rule at its edges, through the hook Apply attached (sigma -> ComfyUI's model timestep ->
    bin -> selector): bin i is edges[i+1] <= t < edges[i], closed at the low end like the expert switch
    (t >= 900 -> high expert). A timestep exactly on an inner edge falls in the bin above it, one float32
    step of sigma higher too, one step lower in the next bin; outside [900, 1000] it clamps and says so.
    The expected bins are written out by hand (EDGES["high"] = 1000, 975, 950, 925, 900)."""
    model = env.shifted(env.apply(env.unet("high"), "tiny_high.safetensors"))
    h = hook(model)
    assert h.edges == (1000.0, 975.0, 950.0, 925.0, 900.0)
    ms = model.get_model_object("model_sampling")

    class Executor:  # what ComfyUI's WrapperExecutor gives an APPLY_MODEL wrapper
        class_obj = type("Model", (), {"model_sampling": ms})()

        def __call__(self, x, t, *args, **kwargs):
            return "ran"

    cases = [  # (edge, side, bin, in calibrated range)
        (1000.0, +1, 0, False), (1000.0, 0, 0, True), (1000.0, -1, 0, True),
        (975.0, +1, 0, True), (975.0, 0, 0, True), (975.0, -1, 1, True),
        (950.0, +1, 1, True), (950.0, 0, 1, True), (950.0, -1, 2, True),
        (925.0, +1, 2, True), (925.0, 0, 2, True), (925.0, -1, 3, True),
        (900.0, +1, 3, True), (900.0, 0, 3, True), (900.0, -1, 3, False),
    ]
    x = torch.zeros(2, 16, 1, 2, 2)
    got = []
    for edge, side, want, _ in cases:
        sigma = sigma_at(ms, edge, side)
        h.selector.set((want + 1) % h.selector.num_bins)  # another bin before the call: the hook must set it
        assert h(Executor(), x, sigma, transformer_options={"sigmas": sigma}) == "ran"
        rec = h.records[-1]
        assert rec.t == edge if side == 0 else (rec.t > edge if side > 0 else rec.t < edge), (edge, side, rec.t)
        assert h.selector.value == rec.bin
        got.append((edge, side, rec.bin, rec.in_range))
    assert got == cases
