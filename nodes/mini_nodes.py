"""Nodes for the pack's mini Wan2.2-I2V model (``minimodel/``), so that its example workflow runs
with no download: the two trained experts shipped with the pack, its seeded text map (instead of
umT5), its fixed linear "VAE" (instead of Wan's VAE) and its procedural start frames.

The rest of the graph is ComfyUI's own Wan2.2 I2V graph (WanImageToVideo, ModelSamplingSD3, two
KSamplerAdvanced, VAEDecode) with the W4A4 nodes, exactly as for the 14B model.
"""
from __future__ import annotations

import comfy.sd

from ..minimodel import EMBEDDED_DIR, EMBEDDED_FILES, data
from ..minimodel import decoder as mini_decoder
from ..minimodel import text as mini_text

CATEGORY = "WanW4A4/mini model"


class MiniLoadExpert:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"expert": (list(EMBEDDED_FILES), {
            "tooltip": "Which expert of the mini model shipped in the pack's minimodel/ folder: the "
                       "high-noise one (t >= 900) or the low-noise one."})}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A BF16 Wan2.2-I2V-shaped expert (dim 256, 6 blocks), as UNETLoader would load it.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an expert of the pack's small trained Wan2.2-I2V model (no download needed)."

    def load(self, expert):
        path = EMBEDDED_DIR / EMBEDDED_FILES[expert]
        if not path.is_file():
            raise FileNotFoundError(f"the mini model's {expert} expert is missing ({path}); reinstall the pack, "
                                    f"or train it with: python -m wan_w4a4.apps.mini_train --out {EMBEDDED_DIR}")
        return (comfy.sd.load_diffusion_model(str(path)),)


class MiniTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "default": "", "tooltip":
                                                 "A caption such as 'a red striped square slides left over a "
                                                 "blue and white checkered background'. Empty = unconditional."})},
                "optional": {"caption": ("STRING", {"forceInput": True, "tooltip":
                                                    "When connected (e.g. from Mini scene), used instead of text."})}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The mini model's text context [1, 32, 4096], in place of CLIPTextEncode with umT5.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Text conditioning for the mini model: a fixed seeded vector per word plus its position."

    def encode(self, text, caption=None):
        return (mini_text.text_conditioning(caption if caption is not None else text),)


class MiniVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = (("The mini model's video 'VAE' (Wan latent layout: 16 channels, 8x spatial, 4x temporal): "
                        "the fixed linear encoder and the learned decoder shipped in minimodel/ (the linear "
                        "decoder if decoder.safetensors is missing); use it with WanImageToVideo and VAEDecode."),)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "The mini model's pixel <-> latent map, in place of wan_2.1_vae."

    def load(self):
        return (mini_decoder.embedded_vae(),)


class MiniScene:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 3_000_000_000, "min": 0, "max": 2**32 - 1, "tooltip":
                                              "Which procedural scene; seeds from 3e9 up were never seen in "
                                              "training (the held-out set)."})}}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("start_image", "caption")
    OUTPUT_TOOLTIPS = ("The scene's first frame, 128 x 128.", "The scene's caption.")
    FUNCTION = "make"
    CATEGORY = CATEGORY
    DESCRIPTION = "A start frame and its caption from the mini model's procedural video generator."

    def make(self, seed):
        scene = data.sample_scene(int(seed))
        frames = data.render([scene])  # [1, T, H, W, 3]
        return (frames[:, 0].contiguous(), data.caption(scene))


NODE_CLASS_MAPPINGS = {
    "WanW4A4MiniLoadExpert": MiniLoadExpert,
    "WanW4A4MiniTextEncode": MiniTextEncode,
    "WanW4A4MiniVAE": MiniVAE,
    "WanW4A4MiniScene": MiniScene,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanW4A4MiniLoadExpert": "Load mini Wan2.2 expert",
    "WanW4A4MiniTextEncode": "Mini text encode",
    "WanW4A4MiniVAE": "Mini VAE",
    "WanW4A4MiniScene": "Mini scene (start frame + caption)",
}
