"""Test-only ComfyUI custom node: Wan2.2 I2V conditioning without a text encoder or a VAE.

Stands in for CLIPTextEncode x2 + WanImageToVideo so that a tiny random Wan checkpoint can be
sampled on CPU, in-process or through a headless server. It sets exactly what WanImageToVideo
sets (comfy_extras/nodes_wan.py): the text context, ``concat_latent_image`` (the VAE-encoded video
whose first frame is the start image) and ``concat_mask`` (0 on the start frame, 1 elsewhere);
here the context and the image latent are random.
"""
import torch

import node_helpers


class WanW4A4TestI2VConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "width": ("INT", {"default": 64, "min": 16, "max": 4096, "step": 16}),
            "height": ("INT", {"default": 64, "min": 16, "max": 4096, "step": 16}),
            "length": ("INT", {"default": 5, "min": 1, "max": 1024, "step": 4}),
            "text_tokens": ("INT", {"default": 16, "min": 1, "max": 512}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "build"
    CATEGORY = "testing/wan_w4a4"

    def build(self, seed, width, height, length, text_tokens):
        g = torch.Generator().manual_seed(seed)
        frames = (length - 1) // 4 + 1
        shape = (1, 16, frames, height // 8, width // 8)
        image_latent = torch.randn(shape, generator=g)
        mask = torch.ones((1, 1, frames, height // 8, width // 8))
        mask[:, :, :1] = 0.0  # the start frame is given
        extra = {"concat_latent_image": image_latent, "concat_mask": mask}
        conds = []
        for _ in range(2):  # positive, negative: umt5 contexts are [B, L, 4096]
            context = torch.randn((1, text_tokens, 4096), generator=g)
            conds.append(node_helpers.conditioning_set_values([[context, {}]], extra))
        return conds[0], conds[1], {"samples": torch.zeros(shape)}


NODE_CLASS_MAPPINGS = {"WanW4A4TestI2VConditioning": WanW4A4TestI2VConditioning}
