"""The "Calibrate W4A4 (Wan2.2 experts)" node: a thin wrapper around ``calibration.calibrate``.

It samples the real two-expert I2V workflow with both BF16 experts, writes one state per expert
into models/w4a4 (plus the JSON report), and returns both experts already patched with them.
Progress goes to ComfyUI's progress bar, and the phase, pass, layer and ETA to the node as progress text;
the Cancel button raises inside the calibration loop (``throw_exception_if_processing_interrupted``),
which writes no state (finished layers stay in the work folder, and the next run resumes from them).
"""
from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..calibration import CalibrationConfig, CalibrationItem, calibrate
from ..calibration.config import (
    CLIP_POLICIES,
    DEFAULT_ALPHAS,
    DEFAULT_CLIPS,
    I2V_BOUNDARY,
)
from ..kernels import format as fmt
from . import apply as ap
from . import paths

log = logging.getLogger(__name__)


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """'1, 0.95, 0.9' -> (1.0, 0.95, 0.9); a clear error naming the input otherwise."""
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


HANDOVERS = ("boundary", "step")


def seed_control_options() -> dict:
    """The seed widget's start mode, where this ComfyUI lets a node declare one: ``fixed``, so that
    each Run does not recalibrate with a new seed.

    ComfyUI 0.33's own seed widgets declare it (``control_after_generate=io.ControlAfterGenerate.fixed``,
    sent to the frontend as the string "fixed"). ComfyUI 0.3.64's ``io`` has no ``ControlAfterGenerate``:
    there the option is a bool and its frontend's node schema accepts only a bool, so a string would make
    the node definition invalid; there the frontend's default for an input named ``seed`` stays."""
    try:
        from comfy_api.latest import _io as io
    except ImportError:
        return {}
    mode = getattr(io, "ControlAfterGenerate", None)
    return {"control_after_generate": mode.fixed.value} if mode is not None else {}


def db_text(value) -> str:
    """A dB figure of the report (a float, or "inf"/"-inf"/None where the JSON keeps no finite number)
    as the node shows it: two decimals."""
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def show_text(text: str, node_id) -> None:
    """``text`` under the node in ComfyUI's frontend (``PromptServer.send_progress_text``), when it runs in
    a server (not in-process tests or scripts)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if node_id is not None and server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, str(node_id))


def handover_step_of(handover: str, step: int) -> int | None:
    """The node's hand-over widgets as CalibrationConfig.handover_step (None: by boundary)."""
    if handover not in HANDOVERS:
        raise ValueError(f"handover must be one of {HANDOVERS}, got {handover!r}")
    return int(step) if handover == "step" else None


IMAGE_INPUTS = {
    "positive": ("CONDITIONING", {"tooltip": "Positive conditioning from WanImageToVideo (prompt + start image). "
                                             "Needed unless calibration_set is connected."}),
    "negative": ("CONDITIONING", {"tooltip": "Negative conditioning from WanImageToVideo."}),
    "latent": ("LATENT", {"tooltip": "The video latent from WanImageToVideo; a batch calibrates on all of it."}),
}


def calibration_items(positive, negative, latent, seed: int, runs: int, calibration_set=None) -> list:
    """The items the node calibrates on: the calibration set when connected, else ``runs`` runs of the
    one (positive, negative, latent) with seeds seed, seed+1, ..."""
    single = [v is not None for v in (positive, negative, latent)]
    if calibration_set is not None:
        if any(single):
            log.info("Calibrate W4A4: both a calibration_set (%d items) and positive/negative/latent are "
                     "connected; calibrating on the calibration_set", len(calibration_set))
        if not calibration_set or not all(isinstance(i, CalibrationItem) for i in calibration_set):
            raise ValueError("calibration_set must be the output of 'W4A4 Calibration Set' (a non-empty list of "
                             "calibration items)")
        return list(calibration_set)
    if not all(single):
        missing = [n for n, ok in zip(IMAGE_INPUTS, single) if not ok]
        raise ValueError(f"Calibrate W4A4: connect {', '.join(missing)} (from WanImageToVideo), or a "
                         "calibration_set from 'W4A4 Calibration Set'")
    return [CalibrationItem(positive, negative, latent["samples"], seed=seed + i) for i in range(runs)]


class CalibrateW4A4:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_high": ("MODEL", {"tooltip": "The high-noise expert, BF16, straight from UNETLoader "
                                                "(no ModelSamplingSD3: 'shift' below is applied here)."}),
            "model_low": ("MODEL", {"tooltip": "The low-noise expert, BF16, straight from UNETLoader."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, **seed_control_options(),
                             "tooltip": "Noise seed of the first calibration run (with a calibration_set: "
                                        "the seed of the calibration's own random choices; the items carry theirs)."}),
            "runs": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                             "Sampling runs with seeds seed, seed+1, ...: more runs, more activation samples. "
                             "Not used with a calibration_set (one run per item)."}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 200, "tooltip": "Sampling steps of your workflow."}),
            "cfg": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "CFG of your workflow."}),
            "shift": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "ModelSamplingSD3 shift of your workflow."}),
            "boundary": ("FLOAT", {"default": I2V_BOUNDARY, "min": 1.0, "max": 999.0, "step": 1.0, "tooltip":
                                   "With handover 'boundary': the model timestep where the low-noise expert "
                                   "takes over (Wan2.2 I2V: 900). Ignored with handover 'step'."}),
            "bins": ("INT", {"default": 4, "min": 1, "max": 32, "tooltip":
                             "Timestep bins per expert; each gets its own activation clip ratio per layer."}),
            "rank": ("INT", {"default": 32, "min": 0, "max": 256, "tooltip":
                             "Rank of the BF16 low-rank branch (SVDQuant). 0 disables it."}),
            "clip_grid": ("STRING", {"default": ", ".join(f"{c:g}" for c in DEFAULT_CLIPS), "tooltip":
                                     "Candidate activation clip ratios, comma-separated, in (0, 1]."}),
            "clip_policy": (list(CLIP_POLICIES), {"default": "per_bin", "tooltip":
                            "per_bin: a ratio per layer and timestep bin (the paper); per_expert: one per "
                            "layer and expert; global: one per layer for both experts."}),
            "gptq": ("BOOLEAN", {"default": True, "tooltip": "GPTQ on the 4-bit residual (off: round to nearest)."}),
            "name": ("STRING", {"default": "wan22_i2v_w4a4", "tooltip":
                                "Output name: models/w4a4/<name>_high.safetensors, <name>_low.safetensors, "
                                "<name>_report.json."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace existing files of that name."}),
        }, "optional": {
            # Optional since calibration_set can replace them; non-widget inputs, so the widget values of
            # saved workflows and their input slots (model_high, model_low, positive, negative, latent) keep
            # their order.
            **IMAGE_INPUTS,
            "keep": ("STRING", {"default": "", "tooltip":
                                "Layers to keep in BF16: block indices or name patterns, comma-separated "
                                "(e.g. '0, 39, *.ffn.2')."}),
            "rows_per_bin": ("INT", {"default": 1024, "min": 8, "max": 65536, "tooltip":
                                     "Activation rows kept per layer input and bin for the searches."}),
            "alphas": ("STRING", {"default": ", ".join(f"{a:g}" for a in DEFAULT_ALPHAS), "tooltip":
                                  "Smoothing strengths searched per layer (SVDQuant alpha), comma-separated in "
                                  "[0, 1]; fewer values calibrate faster."}),
            "blocks_per_pass": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip":
                                        "Blocks captured per sampling pass (0 = all at once; lower it if "
                                        "calibration runs out of memory)."}),
            # Optional and last, so that workflows saved before them keep their widget values.
            "handover": (list(HANDOVERS), {"default": "boundary", "tooltip":
                         "How your workflow hands over from the high-noise to the low-noise expert. boundary: "
                         "at the model timestep 'boundary'. step: after 'handover_step' steps, as two "
                         "KSamplerAdvanced do (the high one's end_at_step). Each expert's timestep bins then "
                         "cover exactly the timesteps it runs at. ComfyUI's Wan2.2 14B I2V template: step 10 "
                         "of 20 at shift 5."}),
            "handover_step": ("INT", {"default": 10, "min": 1, "max": 199, "tooltip":
                                      "With handover 'step': the step where the low-noise expert takes over "
                                      "(the high-noise KSamplerAdvanced's end_at_step)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler", "tooltip":
                             "Sampler of your workflow."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "simple", "tooltip":
                          "Scheduler of your workflow (with shift and steps, it decides the timesteps each "
                          "expert runs at)."}),
            # Last, so that saved workflows keep their widget values.
            "calibration_set": ("W4A4_CALIBRATION_SET", {"tooltip":
                                "N start images and prompts from 'W4A4 Calibration Set': when connected, "
                                "calibration runs on all of them (one sampling run per item, each with its "
                                "seed) instead of positive / negative / latent and runs."}),
            "gpu_budget_gib": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip":
                               "GPU memory calibration stays under, in GiB (0 = no budget): statistics of as "
                               "many blocks per pass as 40 % of it holds, and ComfyUI loads the expert within "
                               "the rest, streaming the remainder (e.g. 22 on a 24 GB GPU)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL", "MODEL", "STRING")
    RETURN_NAMES = ("model_high", "model_low", "report")
    OUTPUT_TOOLTIPS = ("The high-noise expert patched with its new state.",
                       "The low-noise expert patched with its new state.",
                       "Where the states were written and the per-expert SQNR summary.")
    FUNCTION = "calibrate"
    OUTPUT_NODE = True
    CATEGORY = "WanW4A4"
    DESCRIPTION = ("Calibrates W4A4 states for both Wan2.2 experts on your own image and prompt (or the N "
                   "pairs of a 'W4A4 Calibration Set'): runs the "
                   "two-expert sampling, collects activations per timestep bin, and quantizes every block "
                   "Linear (smoothing, low-rank branch, GPTQ, per-bin clip search). Takes minutes to hours.")

    def calibrate(self, model_high, model_low, positive=None, negative=None, latent=None, *, seed, runs, steps,
                  cfg, shift, boundary, bins, rank, clip_grid, clip_policy, gptq, name, overwrite, keep="",
                  rows_per_bin=1024, alphas="", blocks_per_pass=0, handover="boundary", handover_step=10,
                  sampler_name="euler", scheduler="simple", calibration_set=None, gpu_budget_gib=0.0,
                  unique_id=None):
        keep_list = []
        for k in (keep or "").split(","):
            k = k.strip()
            if k:
                keep_list.append(int(k) if k.isdigit() else k)
        out_dir = os.path.dirname(paths.output_path(f"{name}_high"))
        config = CalibrationConfig(
            steps=steps, cfg=cfg, shift=shift, sampler=sampler_name, scheduler=scheduler, boundary=boundary,
            handover_step=handover_step_of(handover, handover_step), bins=bins, rank=rank,
            clip_grid=parse_floats(clip_grid, "clip_grid"), clip_policy=clip_policy, gptq=gptq,
            alphas=parse_floats(alphas, "alphas") if (alphas or "").strip() else DEFAULT_ALPHAS,
            keep=tuple(keep_list), rows_per_bin=rows_per_bin, blocks_per_pass=blocks_per_pass or None,
            gpu_budget_gib=gpu_budget_gib or None, out_dir=out_dir, name=name, overwrite=overwrite, seed=seed)
        items = calibration_items(positive, negative, latent, seed, runs, calibration_set)
        pbar = comfy.utils.ProgressBar(1)

        def progress(done, total, what):
            pbar.update_absolute(done, total)
            show_text(what, unique_id)

        result = calibrate(model_high, model_low, items, config, progress=progress,
                           cancel=comfy.model_management.throw_exception_if_processing_interrupted)
        patched, covers = [], []
        for expert, model in (("high", model_high), ("low", model_low)):
            path = str(getattr(result, expert))
            layers, meta = fmt.load_state(path)
            patched.append(ap.apply_w4a4_state(model, layers, meta, source=os.path.basename(path)))
            covers.append(f"{expert} t {meta.bin_edges[0]:.1f}..{meta.bin_edges[-1]:.1f}")
        lines = [f"states: {result.high}, {result.low}; report: {result.report}",
                 f"calibrated on {len(items)} item(s)" + (" of the calibration set" if calibration_set is not None
                                                           else ""),
                 f"calibrated for: {fmt.handover_text(meta.handover)}; bins cover {', '.join(covers)}"]
        for expert, d in result.data.get("experts", {}).items():
            lines.append(f"{expert} expert: {len(d.get('layers', []))} layers, pooled layer-output SQNR vs BF16 "
                         f"{db_text(d.get('sqnr_rtn_db_pooled'))} dB (plain RTN W4A4) -> "
                         f"{db_text(d.get('sqnr_after_db_pooled'))} dB")
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (patched[0], patched[1], text)}


NODE_CLASS_MAPPINGS = {"WanW4A4Calibrate": CalibrateW4A4}
NODE_DISPLAY_NAME_MAPPINGS = {"WanW4A4Calibrate": "Calibrate W4A4 (Wan2.2 experts)"}
