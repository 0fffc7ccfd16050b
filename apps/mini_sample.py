"""Two-expert Wan2.2 sampling through ComfyUI's own nodes, in-process.

The standard Wan2.2 I2V graph: each expert goes through ``ModelSamplingSD3`` (shift 8), the high-noise
expert runs ``KSamplerAdvanced`` from step 0 to the boundary step with leftover noise, the
low-noise expert continues from there without adding noise. The official I2V boundary is
t = 900 (sigma 0.9): a step belongs to the high-noise expert while its starting sigma is >= 0.9
(Wan2.2's ``if t >= boundary``), so the split step is computed from the schedule, not fixed.

All functions need ComfyUI initialised in the process (``runtime.comfyui_nodes``; ``load_expert`` calls it).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..minimodel import EMBEDDED_DIR, EMBEDDED_FILES
from ..minimodel.conditioning import i2v_conditioning
from . import runtime

logger = logging.getLogger(__name__)

BOUNDARY = 0.9      # Wan2.2-I2V: t = 900 of 1000
SHIFT = 8.0         # ComfyUI's default for Wan, and the template's ModelSamplingSD3


def _nodes():
    return runtime.comfyui_nodes()


def load_folder(folder) -> tuple:
    """``(high, low, vae)`` of a mini model folder (``minimodel/`` or a ``mini_train --out``): both experts
    through ``load_expert`` and the VAE the pictures decode with (``decoder.embedded_vae`` of its decoder file)."""
    from ..minimodel import decoder as mini_decoder

    folder = Path(folder)
    vae = mini_decoder.embedded_vae(folder / mini_decoder.DECODER_FILE)
    return load_expert(folder / EMBEDDED_FILES["high"]), load_expert(folder / EMBEDDED_FILES["low"]), vae


def load_expert(path, weight_dtype: str = "default"):
    """Loads a Wan checkpoint with ComfyUI's ``UNETLoader`` (its folder is added to
    ``diffusion_models``); returns the MODEL (a ModelPatcher)."""
    nodes = _nodes()
    import folder_paths

    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # UNETLoader takes a file *name*: put this folder first, so that a same-named file in another
    # registered folder (the embedded high_noise.safetensors, say) does not answer instead.
    folder_paths.add_model_folder_path("diffusion_models", str(path.parent), is_default=True)
    folder_paths.filename_list_cache.pop("diffusion_models", None)
    resolved = folder_paths.get_full_path("diffusion_models", path.name)
    if resolved is None or Path(resolved).resolve() != path:
        raise RuntimeError(f"ComfyUI resolves {path.name!r} to {resolved}, not {path}")
    return nodes.UNETLoader().load_unet(path.name, weight_dtype)[0]


def with_shift(model, shift: float = SHIFT):
    """``ModelSamplingSD3(shift)`` applied to ``model`` (a clone; the input is untouched)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    return ModelSamplingSD3().patch(model, shift)[0]


def split_step(model, steps: int, scheduler: str = "simple", boundary: float = BOUNDARY) -> int:
    """Number of leading steps whose starting sigma is >= ``boundary`` (the high-noise expert's)."""
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    return int((sigmas[:-1] >= boundary).sum().item())


def sample_two_expert(high, low, positive, negative, latent, *, steps: int = 20, cfg: float = 1.0,
                      seed: int = 0, shift: float = SHIFT, boundary: float = BOUNDARY,
                      sampler_name: str = "euler", scheduler: str = "simple",
                      return_split: bool = False):
    """Samples ``latent`` (a LATENT dict, e.g. from ``WanImageToVideo``) with the two experts.

    ``high``/``low``: MODELs (e.g. from ``load_expert``; W4A4-patched clones work the same);
    ``positive``/``negative``: CONDITIONING with ``concat_latent_image``/``concat_mask`` set.
    Returns the output LATENT dict (raw latent, as ``VAEDecode`` expects); with ``return_split``,
    ``(latent, split_step)``.
    """
    nodes = _nodes()
    high_m, low_m = with_shift(high, shift), with_shift(low, shift)
    split = split_step(high_m, steps, scheduler, boundary)
    ks = nodes.KSamplerAdvanced()
    common = dict(noise_seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                  positive=positive, negative=negative)
    out = latent
    if split >= steps:  # every step is a high-noise step
        out = ks.sample(high_m, "enable", latent_image=out, start_at_step=0, end_at_step=steps,
                        return_with_leftover_noise="disable", **common)[0]
    elif split == 0:
        out = ks.sample(low_m, "enable", latent_image=out, start_at_step=0, end_at_step=steps,
                        return_with_leftover_noise="disable", **common)[0]
    else:
        out = ks.sample(high_m, "enable", latent_image=out, start_at_step=0, end_at_step=split,
                        return_with_leftover_noise="enable", **common)[0]
        out = ks.sample(low_m, "disable", latent_image=out, start_at_step=split, end_at_step=10000,
                        return_with_leftover_noise="disable", **common)[0]
    logger.debug("two-expert sampling: %d steps, high-noise expert for the first %d", steps, split)
    return (out, split) if return_split else out


def generate(high, low, caption: str, start_frame, *, frames: int = 17, steps: int = 20, seed: int = 0,
             cfg: float = 1.0, negative: str = "", **kwargs):
    """One image-to-video generation of the mini model through the standard graph
    (``WanImageToVideo`` with our text map and linear VAE, then ``sample_two_expert``).

    ``start_frame``: ``[H, W, 3]`` in [0, 1]. Returns the raw output latent ``[1, 16, F, h, w]``
    (``data.LinearVideoVAE().latent_to_rgb`` turns it into pictures).
    """
    positive, negative_cond, latent = i2v_conditioning(caption, start_frame, frames, negative)
    out = sample_two_expert(high, low, positive, negative_cond, latent, steps=steps, cfg=cfg, seed=seed, **kwargs)
    return out["samples"]




def embedded_checkpoints() -> dict:
    """``{"high": Path, "low": Path}`` of the trained mini model shipped in ``minimodel/``."""
    paths = {k: EMBEDDED_DIR / f for k, f in EMBEDDED_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"mini model checkpoint(s) missing: {', '.join(missing)}; train them with "
                                f"python -m wan_w4a4.apps.mini_train --out {EMBEDDED_DIR}")
    return paths
