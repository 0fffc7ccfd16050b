"""The pack's ComfyUI nodes (classic API). Thin: parse inputs, call the library, return outputs.

Files live in ``models/w4a4`` (``paths.py``); states and checkpoints are read and written only by
``kernels/format.py``; patching is ``apply.py``; the hook is ``hook.py``.
"""
from __future__ import annotations

import logging
import os

import torch

from ..kernels import format as fmt
from . import apply as ap
from . import attention as attn
from . import chunking, paths
from . import inspect_node as insp

log = logging.getLogger(__name__)

CATEGORY = "WanW4A4"
NONE = "(none)"

paths.register()

COND_BATCH = (list(chunking.MODES), {
    "default": "auto", "advanced": True,
    "tooltip": "How a CFG step's cond and uncond reach the model. auto: one at a time when a call would "
               "exceed 32k tokens (480p x 81 and up), which halves activation memory at the same speed; "
               "batched: ComfyUI's default (both in one call); split: always one at a time."})
ATTENTION = (list(attn.MODES), {
    "default": "auto", "advanced": True,
    "tooltip": "Which PyTorch attention kernel runs first. auto: cuDNN attention on Hopper GPUs (H100/H200, "
               "measured faster at Wan2.2's shapes), ComfyUI's own order elsewhere; comfy: always ComfyUI's "
               "order; cudnn first: cuDNN first on any GPU. An attention node placed before this one is kept."})


def _other_kind(e: fmt.W4A4FormatError, name: str, want: str) -> ap.W4A4StateError | None:
    """The node-level error for a W4A4 file of the other kind (None: ``e`` is about something else)."""
    found = getattr(e, "found", None)  # format.W4A4WrongKindError
    if want == "state" and found == "checkpoint":
        return ap.W4A4StateError(name, "this is a self-contained W4A4 checkpoint, not a state",
                                 "load it with 'Load W4A4 Wan2.2 model' instead of applying it")
    if want == "checkpoint" and found == "state":
        return ap.W4A4StateError(name, "this is a W4A4 state (quantized layers only), not a self-contained "
                                 "checkpoint", "load the BF16 expert with UNETLoader and add 'Apply W4A4 state'")
    return None


def _load_state(name: str, model=None):
    """(path, layers, meta) of state ``name``; with ``model``, its header is first held against the model
    (layer names, shapes, fingerprint), so that a state for another model is refused before its data is read."""
    path = paths.resolve(name)
    try:
        if model is not None:
            meta, shapes = fmt.read_layout(path, "state")
            ap.check_state_fits(model, shapes, meta, os.path.basename(path))
        layers, meta = fmt.load_state(path)
    except fmt.W4A4FormatError as e:
        raise (_other_kind(e, name, "state") or e) from None
    return path, layers, meta


class ApplyW4A4State:
    """MODEL (BF16 Wan2.2 expert) + a W4A4 state -> the same expert with its Linears in W4A4."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A BF16 Wan2.2 expert straight from UNETLoader (weight_dtype "
                                           "'default'), before ModelSamplingSD3."}),
            "state_name": (paths.list_files("state"), {
                "tooltip": "A W4A4 state calibrated for THIS expert (high-noise or low-noise), from "
                           "models/w4a4/. The state is checked against the model before use."}),
        }, "optional": {"cond_batch": COND_BATCH, "attention": ATTENTION}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = (("The expert with its quantized Linears swapped in as model patches and the "
                       "timestep-aware clip hook attached; the input MODEL is unchanged."),)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs a Wan2.2 expert with 4-bit weights and 4-bit activations: the state's layers replace "
                   "the model's Linears (SVDQuant low-rank branch + GPTQ residual), and each sampling step "
                   "uses the activation clip ratios of its timestep bin.")

    def apply(self, model, state_name, cond_batch="auto", attention="auto"):
        path, layers, meta = _load_state(state_name, model)
        return (ap.apply_w4a4_state(model, layers, meta, source=os.path.basename(path), cond_batch=cond_batch,
                                    attention=attention),)


class LoadW4A4Model:
    """A self-contained W4A4 checkpoint -> MODEL; BF16 weights of quantized layers never exist."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (paths.list_files("checkpoint"), {
                "tooltip": "A self-contained W4A4 Wan2.2 expert (made by 'Save W4A4 checkpoint') from "
                           "models/w4a4/. Replaces UNETLoader; memory is about the quantized size."}),
        }, "optional": {"cond_batch": COND_BATCH, "attention": ATTENTION}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The W4A4 expert with its timestep-aware clip hook; connect it to ModelSamplingSD3.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a Wan2.2 expert saved as one W4A4 file (4-bit block Linears + the BF16 rest)."

    def load(self, ckpt_name, cond_batch="auto", attention="auto"):
        path = paths.resolve(ckpt_name)
        try:
            return (ap.load_w4a4_checkpoint(path, cond_batch=cond_batch, attention=attention),)
        except fmt.W4A4FormatError as e:
            raise (_other_kind(e, ckpt_name, "checkpoint") or e) from None


class SaveW4A4Checkpoint:
    """A W4A4 MODEL -> one self-contained file in models/w4a4 (atomic, never silently overwritten)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The output of 'Apply W4A4 state' (or of the calibration node)."}),
            "filename": ("STRING", {"default": "wan22_i2v_high_w4a4", "tooltip":
                         "File name inside models/w4a4/ ('.safetensors' is added); sub-folders allowed."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                          "Replace an existing file of that name. Off: an existing file is an error."}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the checkpoint was written.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = ("Writes the patched expert as one file (W4A4 layers + the BF16 rest + metadata: expert, "
                   "timestep bins, source fingerprint) that 'Load W4A4 Wan2.2 model' opens without the BF16 model.")

    def save(self, model, filename, overwrite):
        path = paths.output_path(filename)
        ap.save_w4a4_checkpoint(model, path, overwrite=overwrite)
        return {"ui": {"text": [path]}, "result": (path,)}


class InspectW4A4State:
    """States -> a heatmap of their clip ratios (layers x bins, a panel per expert) + a summary."""

    @classmethod
    def INPUT_TYPES(cls):
        files = paths.list_files()
        return {"required": {
            "state_high": (files, {"tooltip": "The high-noise expert's state (or W4A4 checkpoint)."}),
            "state_low": ([NONE] + files, {"tooltip": "The low-noise expert's state, or (none)."}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("heatmap", "summary")
    OUTPUT_TOOLTIPS = (("Clip ratio per layer (x) and timestep bin (y), one panel per expert; a strip of "
                       "per-layer SQNR when the calibration report is beside the state."),
                       "Bins, policy, fingerprint, clip statistics per bin and per-layer error summary.")
    FUNCTION = "inspect"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Shows which activation clip ratios calibration chose for each layer and timestep bin."

    def inspect(self, state_high, state_low):
        panels = [insp.read_panel(paths.resolve(n)) for n in (state_high, state_low) if n and n != NONE]
        image = torch.from_numpy(insp.render(panels).copy()).float().div_(255.0)[None]
        text = "\n\n".join(insp.summary(p) for p in panels)
        return {"ui": {"text": [text]}, "result": (image, text)}


NODE_CLASS_MAPPINGS = {
    "WanW4A4ApplyState": ApplyW4A4State,
    "WanW4A4LoadModel": LoadW4A4Model,
    "WanW4A4SaveCheckpoint": SaveW4A4Checkpoint,
    "WanW4A4InspectState": InspectW4A4State,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanW4A4ApplyState": "Apply W4A4 state",
    "WanW4A4LoadModel": "Load W4A4 Wan2.2 model",
    "WanW4A4SaveCheckpoint": "Save W4A4 checkpoint",
    "WanW4A4InspectState": "Inspect W4A4 state",
}
