"""The "W4A4 Calibration Set" node: N (start image, prompt) pairs from a folder under ComfyUI's input
directory, encoded as the Wan2.2 I2V template encodes one pair (CLIPTextEncode on both prompts,
WanImageToVideo), into one ``W4A4_CALIBRATION_SET`` for the Calibrate node's ``calibration_set``
input: one queued run calibrates on every pair. Parsing and encoding live in calibration/dataset.py.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

import nodes

from ..calibration import dataset as ds
from .calibrate_node import seed_control_options

log = logging.getLogger(__name__)

SET_TYPE = "W4A4_CALIBRATION_SET"  # a list of calibration.CalibrationItem


def set_folder(name: str) -> Path:
    """The set folder ``name``, a path relative to ComfyUI's input directory that stays inside it."""
    base = Path(folder_paths.get_input_directory())
    path = ds.path_inside(base, name, "W4A4 Calibration Set: folder")
    if not path.is_dir():
        raise ds.CalibrationSetError(f"W4A4 Calibration Set: folder {name!r} in {base} is not a folder")
    return path


def folder_stamp(path: Path) -> str:
    """Names, sizes and modification times of the folder's files: changes when an image or the prompts
    file does, so that ComfyUI re-encodes the set instead of reusing its cached output."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):  # prompts.jsonl may name images in sub-folders
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def summary(cset: ds.CalibrationSet, size: ds.EncodeSize) -> str:
    lines = [f"{len(cset)} items from {cset.source}, encoded at {size.width}x{size.height}, {size.length} frames"]
    for e in cset.entries:
        lines.append(f"{e.image.name} (seed {e.seed}): {e.prompt[:80]}{'...' if len(e.prompt) > 80 else ''}")
    return "\n".join(lines)


class W4A4CalibrationSet:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "Wan's text encoder (CLIPLoader, type 'wan': umT5), as in your workflow."}),
            "vae": ("VAE", {"tooltip": "Wan's VAE (VAELoader), as in your workflow."}),
            "folder": ("STRING", {"default": "calibration_set", "tooltip":
                                  "A folder inside ComfyUI's input directory holding the start images (png, jpg, "
                                  "webp) and prompts.txt (one prompt per image, in sorted file-name order) or "
                                  "prompts.jsonl (one {\"image\", \"prompt\", \"negative\", \"seed\"} per line)."}),
            "width": ("INT", {"default": 640, "min": 16, "max": nodes.MAX_RESOLUTION, "step": 16, "tooltip":
                              "Video width, as WanImageToVideo in your workflow."}),
            "height": ("INT", {"default": 640, "min": 16, "max": nodes.MAX_RESOLUTION, "step": 16, "tooltip":
                               "Video height, as WanImageToVideo in your workflow."}),
            "length": ("INT", {"default": 81, "min": 1, "max": nodes.MAX_RESOLUTION, "step": 4, "tooltip":
                               "Video length in frames (1 + 4k), as WanImageToVideo in your workflow."}),
            "negative": ("STRING", {"multiline": True, "default": ds.WAN_NEGATIVE, "tooltip":
                                    "Negative prompt of the items that do not set one (the Wan2.2 template's)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, **seed_control_options(),
                             "tooltip": "Noise seed of item i is seed + i, unless prompts.jsonl sets its own."}),
        }, "optional": {
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                                   "Prompts typed here instead of the folder's prompts file: one per line for "
                                   "the images in sorted file-name order, or JSON lines. Empty: the folder's file."}),
        }}

    RETURN_TYPES = (SET_TYPE, "STRING")
    RETURN_NAMES = ("calibration_set", "summary")
    OUTPUT_TOOLTIPS = (("The encoded pairs; connect to 'Calibrate W4A4' (calibration_set), which then "
                        "calibrates on all of them in one run."),
                       "Which images, prompts and seeds the set holds.")
    FUNCTION = "build"
    CATEGORY = "WanW4A4"
    DESCRIPTION = ("A calibration set for 'Calibrate W4A4': a folder of start images with their prompts, each "
                   "encoded as the Wan2.2 I2V template does (CLIPTextEncode, WanImageToVideo).")

    @classmethod
    def IS_CHANGED(cls, folder="", **kwargs):
        try:
            return folder_stamp(set_folder(folder))
        except (ValueError, OSError):
            return float("nan")  # never equal: the node runs and reports the problem

    def build(self, clip, vae, folder, width, height, length, negative, seed, prompts=""):
        size = ds.EncodeSize(width=int(width), height=int(height), length=int(length))
        cset = ds.load_set(set_folder(folder), prompts_text=prompts, negative=negative, seed=int(seed))
        ds.check_images(cset)
        pbar = comfy.utils.ProgressBar(len(cset))
        items = ds.encode_set(cset, clip, vae, size, progress=lambda done, total, what: pbar.update_absolute(done),
                              cancel=comfy.model_management.throw_exception_if_processing_interrupted)
        text = summary(cset, size)
        return {"ui": {"text": [text]}, "result": (items, text)}


NODE_CLASS_MAPPINGS = {"WanW4A4CalibrationSet": W4A4CalibrationSet}
NODE_DISPLAY_NAME_MAPPINGS = {"WanW4A4CalibrationSet": "W4A4 Calibration Set"}
