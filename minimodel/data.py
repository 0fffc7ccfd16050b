"""Procedural videos for the mini Wan2.2-I2V model, and the fixed linear "VAE" that maps them to
Wan's latent layout.

Scenes
------
A scene is one or two textured shapes (square, circle, triangle, diamond, star, ring) over a
textured, two-coloured background (striped, checkered, wavy, dotted). Each shape does one thing
(slides in a direction, bounces, spins clockwise or counterclockwise, grows, shrinks, stays
still); the camera is static or pans in one of four directions. Each motion covers a fixed amount over
the clip (``SLIDE_PX``, ``BOUNCE_PX``, ``SPIN_RAD``, ``SCALE``, ``PAN_PX``), so the start frame and the caption
fix the whole video: the model is never asked to guess how far. ``sample_scene(seed)`` draws the
parameters with numpy's legacy ``RandomState`` (its stream is frozen across numpy versions, so a
seed means the same scene everywhere); ``caption(scene)`` writes them as a sentence, e.g.
"a red striped square slides left over a blue and white checkered background while the camera
pans up". ``render(scenes)`` draws the frames with batched torch ops (on any device, no
randomness): ``[B, T, H, W, 3]`` in [0, 1], T = 1 + 4k frames (default 17), 128 x 128 pixels.

Seeds: training uses seeds below ``TRAIN_SEED_LIMIT``; the held-out set uses
``HELDOUT_SEED_BASE + i`` (``heldout_seeds``), so the two never overlap.

The linear video VAE (pixels <-> Wan latent)
--------------------------------------------
``LinearVideoVAE`` is Wan's latent *layout* without Wan's VAE network: 16 channels, 8x spatial and
4x temporal compression with the first frame alone, so T = 1 + 4k frames give 1 + k latent frames.

encode (pixels p in [0, 1], frames [T, H, W, 3]):
  1. x = 2p - 1 (ComfyUI feeds its VAEs [0, 1] images; Wan's VAE works on [-1, 1]).
  2. time: latent frame 0 is frame 0; latent frame j >= 1 is the mean of frames 4j-3 .. 4j.
  3. colour: an orthonormal opponent transform, Y = (R+G+B)/sqrt3, O1 = (R-G)/sqrt2,
     O2 = (R+G-2B)/sqrt6.
  4. space: per 8x8 block, orthonormal 2-D DCT-II coefficients: ten of Y (the low frequencies
     (u, v) listed in ``CHANNELS``) and three each of O1 and O2 ((0,0), (0,1), (1,0)).
     Steps 3-4 are one fixed 16 x 192 matrix with orthonormal rows (``encode_matrix()``).
  5. normalise: z_c = f_c / FEATURE_STD[c] (the std of each coefficient over generated videos, so
     z has unit variance per channel), and write raw = mean_c + std_c * z_c with ComfyUI's
     ``latent_formats.Wan21`` ``latents_mean``/``latents_std``. ComfyUI's ``process_latent_in``
     (``(raw - mean) / std``) therefore hands the model exactly z: the model sees unit-variance
     latents, as with the real VAE, and a mid-grey frame (p = 0.5) encodes to z = 0.
decode is the transpose (the least-squares inverse): each 8x8 block is rebuilt from its 16
coefficients, so pictures are a low-pass (blocky, blurred) version of the frames, and each latent
frame decodes to one picture (the mean of its 4 frames).

The class also has the two methods ComfyUI's nodes call on a VAE (``encode`` on
``[T, H, W, 3]`` pixels, ``decode`` on a latent), so it can be passed as the ``vae`` input of
``WanImageToVideo`` and ``VAEDecode``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

# ---- sizes -------------------------------------------------------------------------------------
HEIGHT = WIDTH = 128          # pixels
FRAMES = 17                   # 1 + 4k pixel frames
SPATIAL = 8                   # Wan VAE: 8x spatial compression
TEMPORAL = 4                  # Wan VAE: 4x temporal compression, first frame alone
LATENT_CHANNELS = 16

TRAIN_SEED_LIMIT = 2_000_000_000       # training seeds lie in [0, TRAIN_SEED_LIMIT)
HELDOUT_SEED_BASE = 3_000_000_000      # held-out seeds: HELDOUT_SEED_BASE + i (< 2**32)


def latent_frames(frames: int) -> int:
    if frames < 1 or (frames - 1) % TEMPORAL:
        raise ValueError(f"frames must be 1 + {TEMPORAL}k (Wan's VAE layout), got {frames}")
    return 1 + (frames - 1) // TEMPORAL


def heldout_seeds(n: int) -> list[int]:
    """The first ``n`` held-out scene seeds (disjoint from every training seed)."""
    return [HELDOUT_SEED_BASE + i for i in range(n)]


# ---- scene parameters ----------------------------------------------------------------------------
COLORS = {  # name -> RGB in [0, 1]
    "red": (0.90, 0.12, 0.10), "green": (0.15, 0.72, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.97, 0.88, 0.12), "orange": (1.00, 0.55, 0.05), "purple": (0.58, 0.20, 0.80),
    "pink": (1.00, 0.50, 0.72), "cyan": (0.10, 0.85, 0.90), "white": (0.96, 0.96, 0.96),
    "black": (0.07, 0.07, 0.07), "brown": (0.55, 0.33, 0.14), "gray": (0.50, 0.50, 0.52),
}
SHAPES = ("square", "circle", "triangle", "diamond", "star", "ring")
SHAPE_TEXTURES = ("solid", "striped", "checkered")
BACKGROUNDS = ("striped", "checkered", "wavy", "dotted")
MOTIONS = ("slides", "bounces", "spins", "grows", "shrinks", "stays still")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPINS = ("clockwise", "counterclockwise")
# How far each motion goes over the clip. They are fixed, not drawn: a caption names a motion's kind and
# direction, so a drawn amount would leave part of every future open, and a generation that hedges between
# amounts smears (minimodel/README.md, Limits). Values: the middle of the ranges the first data version drew.
SLIDE_PX = 44.0          # slide distance
BOUNCE_PX = 34.0         # bounce height
SPIN_RAD = math.pi       # turn
SCALE = 1.7              # size ratio of "grows" and "shrinks"
PAN_PX = 28.0            # camera pan distance


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str            # SHAPES
    color: str           # COLORS
    texture: str         # SHAPE_TEXTURES
    motion: str          # MOTIONS
    direction: str       # DIRECTIONS key for "slides", SPINS entry for "spins", "" otherwise
    x: float             # world position at frame 0 (pixels; world = screen at frame 0)
    y: float
    radius: float        # pixels
    angle: float         # radians at frame 0 (y points down, so a growing angle turns clockwise)
    amount: float        # slide distance (px), bounce height (px), spin (rad), scale factor: the constants above
    bounces: int = 1


@dataclasses.dataclass(frozen=True)
class Scene:
    seed: int
    shapes: tuple[Shape, ...]
    background: str      # BACKGROUNDS
    bg_colors: tuple[str, str]
    bg_period: float     # pixels
    bg_angle: float      # radians (stripes, waves)
    camera: str          # "" (static) or a DIRECTIONS key
    camera_distance: float  # pixels over the clip


def _pick(rng: np.random.RandomState, items: Sequence):
    return items[int(rng.randint(len(items)))]


def _sample_shape(rng, colors, first: bool) -> Shape:
    kind = _pick(rng, SHAPES)
    motions = MOTIONS[:-1] if first else MOTIONS
    motion = _pick(rng, motions)
    texture = _pick(rng, SHAPE_TEXTURES)
    if motion == "spins" and kind in ("circle", "ring") and texture == "solid":
        texture = "striped"  # a plain disc turning is invisible: keep the caption true
    radius = float(rng.uniform(15, 26))
    angle = float(rng.uniform(0, 2 * math.pi))
    direction, amount, bounces = "", 0.0, 1
    lo, hi = radius + 4, WIDTH - radius - 4
    # Each motion still takes the draw its amount was once drawn by, so that a seed keeps its shapes, colours,
    # textures, angles, background, camera and caption (the held-out scenes stay the same scenes); a sliding or
    # bouncing shape's start point and a growing shape's start size follow from the amount.
    if motion == "slides":
        direction = _pick(rng, tuple(DIRECTIONS))
        rng.uniform(32, 56)
        amount = SLIDE_PX
        dx, dy = DIRECTIONS[direction]
        # start so that the whole path stays in view
        x = float(rng.uniform(lo - min(dx, 0) * amount, hi - max(dx, 0) * amount))
        y = float(rng.uniform(lo - min(dy, 0) * amount, hi - max(dy, 0) * amount))
    elif motion == "bounces":
        rng.uniform(24, 44)
        amount = BOUNCE_PX
        x = float(rng.uniform(lo, hi))
        y = float(rng.uniform(lo + amount, hi))  # y is the floor; the top of the bounce stays in view
    else:
        if motion == "spins":
            direction = _pick(rng, SPINS)
            rng.uniform(0.5, 1.5)
            amount = SPIN_RAD
        elif motion in ("grows", "shrinks"):
            rng.uniform(1.5, 1.9)
            amount = SCALE
            if motion == "grows":
                radius = radius / math.sqrt(amount)
        x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    return Shape(kind, colors.pop(int(rng.randint(len(colors)))), texture, motion, direction,
                 x, y, radius, angle, amount, bounces)


def sample_scene(seed: int) -> Scene:
    """The scene of ``seed`` (0 <= seed < 2**32); same seed, same scene, on any machine."""
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"scene seed must be in [0, 2**32), got {seed}")
    rng = np.random.RandomState(int(seed))
    colors = list(COLORS)
    bg_colors = (colors.pop(int(rng.randint(len(colors)))), colors.pop(int(rng.randint(len(colors)))))
    background = _pick(rng, BACKGROUNDS)
    bg_period = float(rng.uniform(24, 48))
    bg_angle = float(rng.uniform(0, math.pi))
    n_shapes = 1 + int(rng.rand() < 0.5)
    shapes = tuple(_sample_shape(rng, colors, first=(i == 0)) for i in range(n_shapes))
    camera = "" if rng.rand() < 0.4 else _pick(rng, tuple(DIRECTIONS))
    if camera:
        rng.uniform(16, 40)
    camera_distance = PAN_PX if camera else 0.0
    return Scene(int(seed), shapes, background, bg_colors, bg_period, bg_angle, camera, camera_distance)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_phrase(s: Shape) -> str:
    adj = "" if s.texture == "solid" else s.texture + " "
    motion = {"slides": f"slides {s.direction}", "spins": f"spins {s.direction}"}.get(s.motion, s.motion)
    return f"{_article(s.color)} {s.color} {adj}{s.kind} {motion}"


def caption(scene: Scene) -> str:
    """The scene as a sentence, built only from its parameters."""
    text = " and ".join(_shape_phrase(s) for s in scene.shapes)
    c1, c2 = scene.bg_colors
    text += f" over {_article(c1)} {c1} and {c2} {scene.background} background"
    if scene.camera:
        text += f" while the camera pans {scene.camera}"
    return text


# ---- trajectories ----------------------------------------------------------------------------------
def trajectories(scene: Scene, frames: int = FRAMES):
    """Per-frame world state: ``(shapes [S, T, 4] = (x, y, angle, scale), camera [T, 2])``.

    Camera offset c(t): a pixel at screen position p shows world point p + c(t); "pans left"
    means the view moves left (c_x decreases), so the picture content moves right.
    """
    s = np.linspace(0.0, 1.0, frames)
    out = np.zeros((len(scene.shapes), frames, 4))
    for i, sh in enumerate(scene.shapes):
        x = np.full(frames, sh.x)
        y = np.full(frames, sh.y)
        angle = np.full(frames, sh.angle)
        scale = np.ones(frames)
        if sh.motion == "slides":
            dx, dy = DIRECTIONS[sh.direction]
            x, y = x + dx * sh.amount * s, y + dy * sh.amount * s
        elif sh.motion == "bounces":
            y = y - sh.amount * np.abs(np.sin(math.pi * sh.bounces * s))
        elif sh.motion == "spins":
            angle = angle + (1.0 if sh.direction == "clockwise" else -1.0) * sh.amount * s
        elif sh.motion == "grows":
            scale = sh.amount ** s
        elif sh.motion == "shrinks":
            scale = sh.amount ** (-s)
        out[i] = np.stack([x, y, angle, scale], -1)
    cam = np.zeros((frames, 2))
    if scene.camera:
        dx, dy = DIRECTIONS[scene.camera]
        cam = np.stack([dx * scene.camera_distance * s, dy * scene.camera_distance * s], -1)
    return out, cam


# ---- rendering -------------------------------------------------------------------------------------
def _soft(v: torch.Tensor, sharp: float = 4.0) -> torch.Tensor:
    """A square wave with soft edges, from a sine-like signal in [-1, 1]: values in [0, 1]."""
    return 0.5 + 0.5 * torch.tanh(sharp * v)


def _background_pattern(kind: str, X, Y, period, angle):
    """Pattern value in [0, 1] at world coordinates X, Y ([n, T, H, W]); period, angle [n, 1, 1, 1]."""
    u = X * torch.cos(angle) + Y * torch.sin(angle)
    v = -X * torch.sin(angle) + Y * torch.cos(angle)
    w = 2 * math.pi / period
    if kind == "striped":
        return _soft(torch.sin(w * u))
    if kind == "checkered":
        return _soft(torch.sin(w * X) * torch.sin(w * Y), 6.0)
    if kind == "wavy":
        return 0.5 + 0.5 * torch.sin(w * u + 1.5 * torch.sin(0.5 * w * v))
    if kind == "dotted":
        gx = torch.remainder(X, period) - period / 2
        gy = torch.remainder(Y, period) - period / 2
        return (0.3 * period - torch.sqrt(gx * gx + gy * gy)).clamp(0, 1)
    raise ValueError(f"unknown background kind {kind!r}; known: {BACKGROUNDS}")


def _sdf(kind: str, qx, qy):
    """Signed distance (in radii; < 0 inside) of a unit shape at local coordinates qx, qy."""
    if kind == "circle":
        return torch.sqrt(qx * qx + qy * qy) - 1.0
    if kind == "square":
        dx, dy = qx.abs() - 0.85, qy.abs() - 0.85
        outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
        return outside + torch.maximum(dx, dy).clamp(max=0)
    if kind == "diamond":
        return (qx.abs() + qy.abs() - 1.15) / math.sqrt(2)
    if kind == "triangle":  # equilateral, pointing up (local y down), circumradius 1.15
        k = math.sqrt(3.0)
        r = 1.15 * 0.5  # inradius
        px, py = qx.abs(), -qy
        d1 = (k * px + py) / 2 - r
        return torch.maximum(d1, -py - r)
    if kind == "star":  # five points; a radial approximation of the distance is enough at 1 px
        rho = torch.sqrt(qx * qx + qy * qy)
        phi = torch.atan2(qy, qx)
        return (rho - (0.72 + 0.33 * torch.cos(5 * phi))) * 0.8
    if kind == "ring":
        return (torch.sqrt(qx * qx + qy * qy) - 0.75).abs() - 0.28
    raise ValueError(f"unknown shape kind {kind!r}; known: {SHAPES}")


def _shape_texture(texture: str, lx, ly, radius):
    """Texture value in [0, 1] at shape-local pixel coordinates (they turn and scale with the shape)."""
    if texture == "solid":
        return torch.zeros_like(lx)
    period = 0.8 * radius
    if texture == "striped":
        return _soft(torch.sin(2 * math.pi * lx / period))
    if texture == "checkered":
        return _soft(torch.sin(2 * math.pi * lx / period) * torch.sin(2 * math.pi * ly / period), 6.0)
    raise ValueError(f"unknown shape texture {texture!r}; known: {SHAPE_TEXTURES}")


def _shade(rgb) -> tuple[float, float, float]:
    """The second tone of a textured shape: darker for light colours, lighter for dark ones."""
    lum = 0.3 * rgb[0] + 0.59 * rgb[1] + 0.11 * rgb[2]
    return tuple(c * 0.45 for c in rgb) if lum > 0.35 else tuple(c * 0.5 + 0.45 for c in rgb)


def _rgb(names, device) -> torch.Tensor:
    return torch.tensor([COLORS[n] for n in names], dtype=torch.float32, device=device)


def render(scenes: Sequence[Scene], frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH,
           device="cpu") -> torch.Tensor:
    """Frames of ``scenes``: float32 ``[B, T, H, W, 3]`` in [0, 1]; deterministic."""
    latent_frames(frames)  # validates 1 + 4k
    B, T = len(scenes), frames
    dev = torch.device(device)
    f32 = dict(dtype=torch.float32, device=dev)
    traj = [trajectories(sc, frames) for sc in scenes]
    cam = torch.tensor(np.stack([c for _, c in traj]), **f32)              # [B, T, 2]
    ys, xs = torch.meshgrid(torch.arange(height, **f32) + 0.5, torch.arange(width, **f32) + 0.5,
                            indexing="ij")
    X = xs + cam[..., 0, None, None]                                        # [B, T, H, W] world
    Y = ys + cam[..., 1, None, None]

    # background
    img = torch.empty(B, T, height, width, 3, **f32)
    for kind in BACKGROUNDS:
        idx = [i for i, sc in enumerate(scenes) if sc.background == kind]
        if not idx:
            continue
        sel = torch.tensor(idx, device=dev)
        period = torch.tensor([scenes[i].bg_period for i in idx], **f32).view(-1, 1, 1, 1)
        angle = torch.tensor([scenes[i].bg_angle for i in idx], **f32).view(-1, 1, 1, 1)
        p = _background_pattern(kind, X[sel], Y[sel], period, angle)[..., None]
        c1 = _rgb([scenes[i].bg_colors[0] for i in idx], dev).view(-1, 1, 1, 1, 3)
        c2 = _rgb([scenes[i].bg_colors[1] for i in idx], dev).view(-1, 1, 1, 1, 3)
        img[sel] = c1 * (1 - p) + c2 * p

    # shapes, back to front, grouped by (kind, texture) so every op is batched
    for slot in range(max(len(sc.shapes) for sc in scenes)):
        groups: dict[tuple[str, str], list[int]] = {}
        for i, sc in enumerate(scenes):
            if slot < len(sc.shapes):
                groups.setdefault((sc.shapes[slot].kind, sc.shapes[slot].texture), []).append(i)
        for (kind, texture), idx in groups.items():
            sel = torch.tensor(idx, device=dev)
            st = torch.tensor(np.stack([traj[i][0][slot] for i in idx]), **f32)  # [n, T, 4]
            cx, cy, ang, scale = (st[..., k, None, None] for k in range(4))
            radius = torch.tensor([scenes[i].shapes[slot].radius for i in idx], **f32).view(-1, 1, 1, 1)
            r = radius * scale                                                    # px, [n, T, 1, 1]
            dx, dy = X[sel] - cx, Y[sel] - cy
            cos, sin = torch.cos(ang), torch.sin(ang)
            lx, ly = cos * dx + sin * dy, -sin * dx + cos * dy                    # shape-local px
            alpha = (0.5 - _sdf(kind, lx / r, ly / r) * r).clamp(0, 1)[..., None]
            t = _shape_texture(texture, lx / scale, ly / scale, radius)[..., None]
            names = [scenes[i].shapes[slot].color for i in idx]
            base = _rgb(names, dev).view(-1, 1, 1, 1, 3)
            shade = torch.tensor([_shade(COLORS[n]) for n in names], **f32).view(-1, 1, 1, 1, 3)
            color = base * (1 - t) + shade * t
            img[sel] = img[sel] * (1 - alpha) + color * alpha
    return img.clamp_(0, 1)


# ---- the linear video VAE ------------------------------------------------------------------------
# (colour, u, v): colour 0 = Y, 1 = O1, 2 = O2; (u, v) = (vertical, horizontal) DCT frequency.
CHANNELS = (
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 0, 2), (0, 2, 0), (0, 1, 2), (0, 2, 1),
    (0, 0, 3), (0, 3, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (2, 0, 1), (2, 1, 0),
)
# Std of each coefficient (x in [-1, 1]) over the videos of seeds 0..511 (``feature_std(512)``) of the first
# data version, whose amounts were drawn: dividing by it gives the model unit-variance channels. Kept with the
# fixed amounts (``feature_std(512)`` moves by under 1 % per channel), since the trained experts read latents
# scaled by it.
FEATURE_STD = (
    5.067, 1.215, 1.216, 0.5449, 0.4443, 0.4378, 0.2562, 0.2521,
    0.2186, 0.2140, 4.047, 0.8879, 0.8839, 5.018, 1.132, 1.141,
)
# comfy/latent_formats.py, class Wan21 (ComfyUI 0.3.64): process_in(raw) = (raw - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
_OPPONENT = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=np.float64)
_OPPONENT /= np.linalg.norm(_OPPONENT, axis=1, keepdims=True)


def _dct_basis(n: int = SPATIAL) -> np.ndarray:
    """Orthonormal DCT-II basis, ``[n (frequency), n (position)]``."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    b = np.cos(math.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    b[0] /= math.sqrt(2.0)
    return b


def encode_matrix() -> torch.Tensor:
    """The fixed ``[16, 192]`` projection of a flattened (y, x, rgb) 8x8 patch onto the channel
    coefficients; its rows are orthonormal, so its transpose is the least-squares decoder."""
    d = _dct_basis()
    rows = [np.einsum("y,x,c->yxc", d[u], d[v], _OPPONENT[col]).reshape(-1) for col, u, v in CHANNELS]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


class LinearVideoVAE:
    """Fixed linear map between ``[0, 1]`` video frames and raw Wan-layout latents (module doc)."""

    latent_channels = LATENT_CHANNELS
    spacial_compression = SPATIAL  # ComfyUI's VAE spells it this way (nodes read it)
    temporal_compression = TEMPORAL

    def __init__(self):
        self.matrix = encode_matrix()
        self.feature_std = torch.tensor(FEATURE_STD, dtype=torch.float32)
        self.mean = torch.tensor(WAN21_LATENTS_MEAN, dtype=torch.float32)
        self.std = torch.tensor(WAN21_LATENTS_STD, dtype=torch.float32)

    # -- processed space (what the model sees): z ----------------------------------------------
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised coefficients f of ``[..., T, H, W, 3]`` pixels: ``[..., 16, 1+k, H/8, W/8]``."""
        *lead, T, H, W, C = pixels.shape
        if C != 3 or H % SPATIAL or W % SPATIAL:
            raise ValueError(f"pixels must be [..., T, H, W, 3] with H, W multiples of {SPATIAL}, "
                             f"got {tuple(pixels.shape)}")
        F = latent_frames(T)
        x = pixels.float() * 2 - 1
        first = x[..., :1, :, :, :]
        rest = x[..., 1:, :, :, :].reshape(*lead, F - 1, TEMPORAL, H, W, 3).mean(-4)
        x = torch.cat([first, rest], -4)                                        # [..., F, H, W, 3]
        h, w = H // SPATIAL, W // SPATIAL
        x = x.reshape(*lead, F, h, SPATIAL, w, SPATIAL, 3).movedim(-4, -3)     # [..., F, h, w, 8, 8, 3]
        f = x.reshape(*lead, F, h, w, SPATIAL * SPATIAL * 3) @ self.matrix.to(x.device).T
        return f.movedim(-1, -4)                                                 # [..., 16, F, h, w]

    def encode_normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """z: what ComfyUI's ``process_latent_in`` makes of ``encode(pixels)``."""
        f = self.features(pixels)
        return f / self.feature_std.to(f.device).view(-1, 1, 1, 1)

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., 16, F, h, w]`` z -> ``[..., F, H, W, 3]`` pixels in [0, 1], one frame per latent frame."""
        *lead, C, F, h, w = z.shape
        if C != LATENT_CHANNELS:
            raise ValueError(f"expected {LATENT_CHANNELS} latent channels, got shape {tuple(z.shape)}")
        f = z.float() * self.feature_std.to(z.device).view(-1, 1, 1, 1)
        x = f.movedim(-4, -1) @ self.matrix.to(z.device)                       # [..., F, h, w, 192]
        x = x.reshape(*lead, F, h, w, SPATIAL, SPATIAL, 3).movedim(-3, -4)
        x = x.reshape(*lead, F, h * SPATIAL, w * SPATIAL, 3)
        return ((x + 1) / 2).clamp(0, 1)

    # -- raw space (what a ComfyUI VAE returns) ------------------------------------------------
    def to_raw(self, z: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1, 1)
        return self.mean.to(z.device).view(shape) + self.std.to(z.device).view(shape) * z

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1, 1)
        return (raw.float() - self.mean.to(raw.device).view(shape)) / self.std.to(raw.device).view(shape)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """As ComfyUI's ``VAE.encode`` for a video VAE: ``[T, H, W, 3]`` frames -> ``[1, 16, F, h, w]``
        raw latent (a batch ``[B, T, H, W, 3]`` gives ``[B, 16, F, h, w]``)."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(0)
        return self.to_raw(self.encode_normalized(pixels))

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """As ComfyUI's ``VAE.decode``: ``[B, 16, F, h, w]`` raw latent -> ``[B, F', H, W, 3]``,
        F' = 1 + 4(F - 1) frames (each latent frame held for the frames it covers)."""
        frames = self.decode_normalized(self.from_raw(raw))
        reps = torch.tensor([1] + [TEMPORAL] * (frames.shape[-4] - 1), device=frames.device)
        return frames.repeat_interleave(reps, dim=-4)

    def latent_to_rgb(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latent ``[B, 16, F, h, w]`` -> one picture per latent frame, ``[B, F, H, W, 3]``."""
        return self.decode_normalized(self.from_raw(raw))


def feature_std(n: int = 512, batch: int = 32, device="cpu") -> torch.Tensor:
    """Per-channel std of the unnormalised coefficients over training videos (how FEATURE_STD was made)."""
    vae = LinearVideoVAE()
    acc = torch.zeros(LATENT_CHANNELS, dtype=torch.float64)
    count = 0
    for start in range(0, n, batch):
        scenes = [sample_scene(s) for s in range(start, min(n, start + batch))]
        f = vae.features(render(scenes, device=device)).double()
        acc += (f ** 2).sum(dim=(0, 2, 3, 4)).cpu()
        count += f.numel() // LATENT_CHANNELS
    return (acc / count).sqrt().float()


def first_frame_video(first: torch.Tensor, frames: int = FRAMES) -> torch.Tensor:
    """What ``WanImageToVideo`` encodes for the image condition: the start frame followed by
    mid-grey (0.5) frames, ``[..., T, H, W, 3]`` from a ``[..., H, W, 3]`` frame."""
    grey = torch.full((*first.shape[:-3], frames, *first.shape[-3:]), 0.5, dtype=first.dtype,
                      device=first.device)
    grey[..., 0, :, :, :] = first
    return grey
