"""The image-to-video conditioning of the mini model, built exactly as ComfyUI builds it for
Wan2.2-I2V, so that checkpoints trained here sample correctly through ComfyUI's own graph.

How ComfyUI feeds Wan2.2-I2V (0.3.64):
- ``WanImageToVideo`` (comfy_extras/nodes_wan.py) encodes the start image followed by mid-grey
  frames with the VAE, giving ``concat_latent_image`` (raw latent ``[1, 16, F, h, w]``), and sets
  ``concat_mask`` = ones ``[1, 1, F, h, w]`` with 0 on the latent frames the start image covers
  (frame 0 for one image).
- ``WAN21.concat_cond`` (comfy/model_base.py), for a model with in_dim 36 (detected as
  ``WAN21_T2V``, whose 20 extra channels are image + 4): ``process_latent_in`` on the image
  (``(raw - mean) / std``, latent_formats.Wan21), mask -> ``1 - mask`` repeated to 4 channels, and
  returns ``cat(mask, image)``; ``BaseModel._apply_model`` then feeds ``cat(x, c_concat)``.
- Sampling is flow matching (``CONST``): ``x_t = sigma * noise + (1 - sigma) * x0``, the model
  gets timestep ``1000 * sigma`` and predicts the velocity ``noise - x0``
  (``denoised = x_t - sigma * v``).

So the training input is ``cat(x_t, m, m, m, m, z_img)`` with m = 1 on latent frame 0 and z_img
the normalised latent of [start frame, grey, grey, ...]; ``tests/minimodel/test_train.py``
checks it against what ComfyUI's sampler actually hands the model.

``i2v_conditioning`` builds the ComfyUI-side conditioning with the real ``WanImageToVideo`` node
(it needs ``wan_w4a4.apps.runtime.init_comfyui()``); the training-side functions need only torch.
"""
from __future__ import annotations

import torch

from . import data, text

MASK_CHANNELS = 4


def start_mask(latent_frames: int, height: int, width: int, start_frames: int = 1,
               device=None) -> torch.Tensor:
    """``WanImageToVideo``'s ``concat_mask``: ones ``[1, 1, F, h, w]``, 0 on the latent frames
    covered by ``start_frames`` pixel frames."""
    mask = torch.ones(1, 1, latent_frames, height, width, device=device)
    mask[:, :, : (start_frames - 1) // data.TEMPORAL + 1] = 0.0
    return mask


def concat_channels(image_z: torch.Tensor, concat_mask: torch.Tensor) -> torch.Tensor:
    """``WAN21.concat_cond`` for in_dim 36: ``[B, 4 + 16, F, h, w]`` = cat(1 - mask (x4), image_z).

    ``image_z``: the processed (normalised) image latent ``[B, 16, F, h, w]``; ``concat_mask``:
    ``[1 or B, 1, F, h, w]`` as set by ``WanImageToVideo``.
    """
    B = image_z.shape[0]
    mask = (1.0 - concat_mask.to(image_z)).expand(B, MASK_CHANNELS, *image_z.shape[2:])
    return torch.cat([mask, image_z], dim=1)


def model_input(x_t: torch.Tensor, image_z: torch.Tensor, concat_mask: torch.Tensor) -> torch.Tensor:
    """The 36-channel input ComfyUI gives the Wan transformer: ``cat(x_t, concat_channels)``."""
    return torch.cat([x_t, concat_channels(image_z, concat_mask)], dim=1)


def image_latent(vae: data.LinearVideoVAE, first_frames: torch.Tensor, frames: int = data.FRAMES) -> torch.Tensor:
    """Normalised latent of what ``WanImageToVideo`` encodes: ``[B, H, W, 3]`` start frames ->
    ``[B, 16, F, h, w]`` (latent frame 0 from the image, the grey frames give exactly 0)."""
    return vae.encode_normalized(data.first_frame_video(first_frames, frames))


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``CONST.noise_scaling``: ``sigma * noise + (1 - sigma) * x0`` (sigma ``[B]``)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return s * noise + (1.0 - s) * x0


def i2v_conditioning(caption: str, start_frame: torch.Tensor, frames: int = data.FRAMES,
                     negative: str = "", vae: data.LinearVideoVAE | None = None):
    """``(positive, negative, latent)`` from ComfyUI's own ``WanImageToVideo`` node, with our text
    map and linear VAE: what the standard Wan2.2 I2V graph hands ``KSamplerAdvanced``.

    ``start_frame``: ``[H, W, 3]`` or ``[1, H, W, 3]`` in [0, 1]. Needs an initialised ComfyUI.
    """
    from comfy_extras.nodes_wan import WanImageToVideo

    image = start_frame if start_frame.ndim == 4 else start_frame.unsqueeze(0)
    out = WanImageToVideo.execute(
        positive=text.text_conditioning(caption), negative=text.text_conditioning(negative),
        vae=vae or data.LinearVideoVAE(), width=image.shape[2], height=image.shape[1],
        length=frames, batch_size=1, start_image=image.float().cpu())
    positive, negative_cond, latent = out.result
    return positive, negative_cond, latent
