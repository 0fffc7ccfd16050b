"""A small learned video decoder for the mini model: latent ``[B, 16, F, 16, 16]`` -> frames.

The fixed linear "VAE" (``data.LinearVideoVAE``) rebuilds each 8 x 8 pixel block from its own 16
coefficients alone, so any error in a generated latent shows as a visible block seam, and each latent
frame decodes to one blurred picture (the mean of the 4 frames it covers). This decoder keeps the
linear *encoder* (so the latent space, the denoiser's input/output convention and ComfyUI's latent
format are unchanged) and replaces only the decoding:

    z [B, 16, F, h, w] (normalised latent, what the denoiser sees)
      -> Conv3d 3x3x3 (16 -> stem), SiLU, Conv3d 3x3x3 (stem -> stem), SiLU   neighbouring latent pixels and frames
      -> Conv3d 1x1x1 (stem -> 4 * widths[0]) split into 4 sub-frames per latent frame; latent frame 0
         keeps only its last sub-frame, so F latent frames give T = 1 + 4 (F - 1) pixel frames
      -> per frame, len(widths) times: nearest 2x upsampling, Conv2d 3x3, SiLU   (16 -> 32 -> 64 -> 128 px)
      -> Conv2d 3x3 -> 3 channels: a residual r in [-1, 1] units
    x = linear decode (each latent frame held for its frames) + r;  pixels = clamp((x + 1) / 2, 0, 1)

The last convolution starts at zero, so an untrained decoder *is* the linear decoder (tested); training
(``apps/mini_train.py``) fits it to ground-truth frames from perturbed latents, so that the denoiser's
imperfect latents decode smoothly.

Weights: ``decoder.safetensors`` beside the experts (fp32, about 2.5 MB), written atomically with the
configuration in its header, read back with every key, shape and dtype checked (``load_decoder``).
``LearnedVideoVAE`` is the VAE object with this decoder: ``encode`` is the linear encoder, ``decode``
returns all T frames, ``latent_to_rgb`` one picture per latent frame (pixel frame 4k, the last one it
covers). ``embedded_vae()`` is what the pack's pictures, demo and ComfyUI node use: the learned decoder
shipped in ``minimodel/`` when it is there, else (with a warning) the linear one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import EMBEDDED_DIR, data

logger = logging.getLogger(__name__)

DECODER_FILE = "decoder.safetensors"
FORMAT = "wan_w4a4.mini_decoder/1"
MAX_DECODER_BYTES = 15_000_000  # as the experts: the file ships in the repository


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Channel counts: ``stem`` on the latent grid, ``widths[i]`` after the (i+1)-th 2x upsampling
    (three upsamplings make the 8x spatial factor)."""
    stem: int = 128
    widths: tuple[int, ...] = (64, 32, 16)

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.stem < 1 or len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"DecoderConfig needs stem >= 1 and three positive widths (8x = 2^3 upsampling), "
                             f"got stem={self.stem}, widths={self.widths}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text_: str) -> DecoderConfig:
        d = json.loads(text_)
        return cls(stem=int(d["stem"]), widths=tuple(d["widths"]))


def hold_frames(frames: torch.Tensor) -> torch.Tensor:
    """``[..., F, H, W, 3]`` one picture per latent frame -> ``[..., 1 + 4 (F - 1), H, W, 3]``, each
    latent frame held for the pixel frames it covers (what ``LinearVideoVAE.decode`` returns)."""
    reps = torch.tensor([1] + [data.TEMPORAL] * (frames.shape[-4] - 1), device=frames.device)
    return frames.repeat_interleave(reps, dim=-4)


def last_of_groups(frames: torch.Tensor) -> torch.Tensor:
    """``[..., T, H, W, 3]`` pixel frames -> pixel frames 0, 4, 8, ...: one per latent frame."""
    return frames[..., :: data.TEMPORAL, :, :, :]


class VideoDecoder(nn.Module):
    """The decoder of the module doc. ``forward(z)``: normalised latent ``[B, 16, F, h, w]`` ->
    pixels ``[B, 1 + 4 (F - 1), 8h, 8w, 3]`` in [0, 1]."""

    def __init__(self, config: DecoderConfig = DecoderConfig()):
        super().__init__()
        self.config = config
        c, w = config.stem, config.widths
        self.stem = nn.Sequential(nn.Conv3d(data.LATENT_CHANNELS, c, 3, padding=1), nn.SiLU(),
                                  nn.Conv3d(c, c, 3, padding=1), nn.SiLU())
        self.expand = nn.Conv3d(c, data.TEMPORAL * w[0], 1)
        ups, prev = [], w[0]
        for width in w:
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(prev, width, 3, padding=1), nn.SiLU()]
            prev = width
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(prev, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.linear = data.LinearVideoVAE()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != data.LATENT_CHANNELS:
            raise ValueError(f"expected a latent [B, {data.LATENT_CHANNELS}, F, h, w], got {tuple(z.shape)}")
        B, _, Fl, h, w = z.shape
        z = z.float()
        base = hold_frames(self.linear.decode_normalized(z)) * 2 - 1            # [B, T, H, W, 3] in [-1, 1]
        x = self.expand(self.stem(z))                                            # [B, 4 c, F, h, w]
        c = self.config.widths[0]
        x = x.view(B, data.TEMPORAL, c, Fl, h, w).permute(0, 2, 3, 1, 4, 5)      # [B, c, F, 4, h, w]
        x = x.reshape(B, c, Fl * data.TEMPORAL, h, w)[:, :, data.TEMPORAL - 1:]  # [B, c, T, h, w]
        T = x.shape[2]
        x = x.transpose(1, 2).reshape(B * T, c, h, w)
        r = self.out(self.up(x))                                                 # [B T, 3, H, W]
        r = r.view(B, T, 3, r.shape[-2], r.shape[-1]).permute(0, 1, 3, 4, 2)
        return ((base + r.float() + 1) / 2).clamp(0, 1)


# ---- file --------------------------------------------------------------------------------------------
def save_decoder(decoder: VideoDecoder, path, metadata: dict | None = None, *, overwrite: bool = False) -> dict:
    """Writes ``decoder`` as fp32 safetensors (config and ``metadata`` in the header) the way the pack
    writes its files (``kernels.format.write_bytes``: a temporary file, then a rename that never replaces
    a file another process wrote, unless ``overwrite``). A file over ``MAX_DECODER_BYTES`` is refused
    before anything is written. Returns ``{"file", "bytes", "sha256"}``."""
    import hashlib

    from safetensors.torch import save

    from ..kernels import format as fmt

    path = Path(path)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in decoder.state_dict().items()}
    meta = {"format": "pt", "wan_w4a4.kind": FORMAT, "wan_w4a4.decoder_config": decoder.config.to_json(),
            **{f"wan_w4a4.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}}
    data = save(state, metadata=meta)
    if len(data) > MAX_DECODER_BYTES:
        raise ValueError(f"{path}: the decoder is {len(data) / 1e6:.1f} MB, over the {MAX_DECODER_BYTES / 1e6:.0f} "
                         f"MB budget; use a smaller DecoderConfig")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.write_bytes(path, data, overwrite=overwrite)
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_decoder(path, device="cpu") -> VideoDecoder:
    """Reads a decoder written by ``save_decoder``: checks the header's kind and configuration and every
    tensor's name, shape and dtype before loading; errors name the file and the tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no decoder at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("wan_w4a4.kind") != FORMAT:
                raise ValueError(f"{path}: not a mini-model decoder (header wan_w4a4.kind = "
                                 f"{meta.get('wan_w4a4.kind')!r}, expected {FORMAT!r})")
            try:
                config = DecoderConfig.from_json(meta["wan_w4a4.decoder_config"])
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{path}: bad or missing wan_w4a4.decoder_config in the header ({e})") from None
            decoder = VideoDecoder(config)
            expected = decoder.state_dict()
            keys = set(f.keys())
            if keys != set(expected):
                raise ValueError(f"{path}: tensor names differ from a decoder with {config}: missing "
                                 f"{sorted(set(expected) - keys)[:5]}, unexpected {sorted(keys - set(expected))[:5]}")
            state = {}
            for k, ref in expected.items():
                sl = f.get_slice(k)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if shape != tuple(ref.shape) or dtype != "F32":
                    raise ValueError(f"{path}: tensor {k} is {dtype} {shape}, expected F32 {tuple(ref.shape)}")
                t = f.get_tensor(k)
                if not torch.isfinite(t).all():
                    raise ValueError(f"{path}: tensor {k} has non-finite values")
                state[k] = t
    except Exception as e:
        if isinstance(e, (ValueError, FileNotFoundError)):
            raise
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    decoder.load_state_dict(state)
    return decoder.to(device).eval()


# ---- the VAE object --------------------------------------------------------------------------------
class LearnedVideoVAE(data.LinearVideoVAE):
    """``LinearVideoVAE`` with the learned decoder: same encoder and latent format; ``decode`` returns
    the decoder's T = 1 + 4 (F - 1) frames, ``decode_normalized`` / ``latent_to_rgb`` one picture per
    latent frame (pixel frame 4k)."""

    def __init__(self, decoder: VideoDecoder):
        super().__init__()
        self.decoder = decoder.eval()

    @torch.no_grad()
    def decode_video_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., 16, F, h, w]`` z -> all ``[..., T, H, W, 3]`` pixel frames in [0, 1]."""
        *lead, C, Fl, h, w = z.shape
        p = next(self.decoder.parameters())
        out = self.decoder(z.reshape(-1, C, Fl, h, w).to(p.device))
        return out.reshape(*lead, *out.shape[1:]).to(z.device)

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return last_of_groups(self.decode_video_normalized(z))

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        return self.decode_video_normalized(self.from_raw(raw))

    def latent_to_rgb(self, raw: torch.Tensor) -> torch.Tensor:
        return self.decode_normalized(self.from_raw(raw))


def embedded_decoder_path() -> Path:
    return EMBEDDED_DIR / DECODER_FILE


def embedded_vae(path=None) -> data.LinearVideoVAE:
    """The VAE the pack's pictures, demo and ComfyUI node use: ``LearnedVideoVAE`` with the decoder at
    ``path`` (default: the one shipped in ``minimodel/``) when that file exists, else the linear VAE with a
    warning. A file that exists but is damaged raises (``load_decoder``)."""
    path = Path(path) if path is not None else embedded_decoder_path()
    if not path.is_file():
        logger.warning("no learned decoder at %s: decoding with the linear VAE (8x8 block seams); train one "
                       "with python -m wan_w4a4.apps.mini_train", path)
        return data.LinearVideoVAE()
    return LearnedVideoVAE(load_decoder(path))


def describe(vae: data.LinearVideoVAE) -> str:
    """One phrase naming the pixel space of pictures decoded by ``vae`` (for metric legends)."""
    return "learned decoder" if isinstance(vae, LearnedVideoVAE) else "linear VAE"


# ---- training pieces (the loop is in apps/mini_train.py) -----------------------------------------------
def perturb(z: torch.Tensor, max_noise: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``z`` + per-sample Gaussian noise of std uniform in [0, ``max_noise``]: the decoder learns to
    decode latents a little off the data (as generated ones are) into clean frames."""
    s = torch.rand(z.shape[0], generator=generator, device=z.device) * max_noise
    return z + s.view(-1, 1, 1, 1, 1) * torch.randn(z.shape, generator=generator, device=z.device)


def block_diffs(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per video of ``frames`` ``[B, ..., H, W, 3]``: the mean absolute difference of horizontally and
    vertically adjacent pixels across the edges of the 8 x 8 blocks (one latent pixel each), and inside
    them. Rendered videos have about equal means (ratio 1.06 on held-out scenes); the linear decoding,
    which rebuilds each block from its own 16 coefficients, has boundary means about 3x the inside ones."""
    x = frames.float()
    dx = (x[..., :, 1:, :] - x[..., :, :-1, :]).abs()
    dy = (x[..., 1:, :, :] - x[..., :-1, :, :]).abs()
    edge_w = (torch.arange(dx.shape[-2], device=x.device) + 1) % data.SPATIAL == 0
    edge_h = (torch.arange(dy.shape[-3], device=x.device) + 1) % data.SPATIAL == 0
    B = x.shape[0]
    def mean(*parts):
        return torch.cat([p.reshape(B, -1) for p in parts], dim=1).mean(1)
    return (mean(dx[..., edge_w, :], dy[..., edge_h, :, :]), mean(dx[..., ~edge_w, :], dy[..., ~edge_h, :, :]))


def seam_ratio(frames: torch.Tensor) -> float:
    """Block-seam metric of ``frames`` ``[B, ..., H, W, 3]``: mean |difference| across 8 x 8 block edges
    over the mean inside blocks, over all videos (1: no seams)."""
    edge, inside = block_diffs(frames)
    return float(edge.mean() / inside.mean().clamp_min(1e-12))


def seam_penalty(out: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Mean over videos of how much the block-edge differences of ``out`` exceed its inside ones by more
    than those of the ground truth ``frames`` do (0 when no more). The inside mean is a constant here, so
    the gradient only smooths block edges (it cannot lower the penalty by adding texture inside blocks)."""
    edge, inside = block_diffs(out)
    t_edge, t_inside = block_diffs(frames)
    return ((edge - inside.detach()) - (t_edge - t_inside)).clamp_min(0).mean()


def decoder_loss(decoder: VideoDecoder, z_in: torch.Tensor, frames: torch.Tensor,
                 seam_weight: float = 0.0) -> torch.Tensor:
    """Pixel MSE (the PSNR that the metrics report) of ``decoder(z_in)`` against ground-truth ``frames``
    ``[B, T, H, W, 3]`` in [0, 1], plus ``seam_weight`` x ``seam_penalty``: generated latents decode with
    seams the pixel MSE hardly weighs (their frames need not match the rendered ones pixel by pixel)."""
    out = decoder(z_in)
    loss = F.mse_loss(out, frames.float())
    if seam_weight:
        loss = loss + seam_weight * seam_penalty(out, frames)
    return loss
