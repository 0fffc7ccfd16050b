"""Test helper: a ComfyUI ``fp8_scaled`` Wan checkpoint made from a BF16 one.

Laid out as ComfyUI's own fp8_scaled diffusion models (``wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors``)
are, and as both ComfyUI versions read them:

- a marker tensor ``scaled_fp8`` whose dtype is the fp8 format (0.3.64: ``model_detection.model_config_from_unet``
  sets ``model_config.scaled_fp8`` and picks ``comfy.ops.scaled_fp8_ops``; 0.33: ``comfy.utils.convert_old_quants``
  turns the file into per-layer ``comfy_quant`` float8_e4m3fn layers). Its size says whether fp8 matmuls are
  allowed (2 elements: no); ComfyUI's own saver writes an empty one;
- per Linear ``<layer>.weight`` in float8_e4m3fn, ``<layer>.scale_weight`` a float32 scalar with
  weight = fp8_e4m3fn(w / scale), scale = max|w| / 448; and ``<layer>.scale_input`` = 1 (0.33 drops a scale of 1);
- everything else (norms, modulation, biases, the patch embedding) unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def is_scaled_linear(key: str, t: torch.Tensor) -> bool:
    """The tensors ComfyUI's fp8_scaled files store in fp8: every Linear weight (2-D)."""
    return key.endswith(".weight") and t.ndim == 2


def fp8_scaled_state_dict(sd: dict[str, torch.Tensor], *, marker_elems: int = 0) -> dict[str, torch.Tensor]:
    out = {"scaled_fp8": torch.zeros(marker_elems, dtype=FP8)}
    for key, t in sd.items():
        if not is_scaled_linear(key, t):
            out[key] = t
            continue
        layer = key[:-len(".weight")]
        w = t.float()
        scale = (w.abs().max() / FP8_MAX).to(torch.float32).reshape(())
        out[key] = (w / scale).to(FP8)
        out[f"{layer}.scale_weight"] = scale
        out[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
    return out


def write_fp8_scaled(src: Path, dst: Path, *, marker_elems: int = 0) -> Path:
    """``dst``: the fp8_scaled version of the BF16 checkpoint ``src`` (its metadata kept)."""
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(fp8_scaled_state_dict(load_file(str(src)), marker_elems=marker_elems), str(dst), metadata=metadata)
    return dst


def dequantized(path: Path, layer: str) -> torch.Tensor:
    """float32(weight) * scale_weight of ``layer`` read from the file: the exact dequantized weight."""
    sd = load_file(str(path))
    return sd[f"{layer}.weight"].float() * sd[f"{layer}.scale_weight"].float()
