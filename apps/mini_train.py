"""Trains the mini Wan2.2-I2V model: two experts, as Wan2.2 trains its mixture of experts.

    python -m wan_w4a4.apps.mini_train --out DIR [--minutes M | --steps N | --phase-steps W,H,L]
                                       [--device cuda] [--batch B] [--seed S]

- Model: ComfyUI's own ``comfy.ldm.wan.model.WanModel`` with the Wan2.2-I2V layout (no ``img_emb``,
  in_dim 36) and ``MINI`` shapes (dim 256 = 2 heads of 128, 4 blocks, ffn 768), initialised as
  Wan initialises (``init_state_dict``); ``--arch mini6`` with ``--init-experts`` of 4-block experts grows them
  to 6 blocks (``grow_state_dict``), as the shipped experts were.
- Data: procedural videos (``data.py``), their normalised latents z, captions through the text map
  (``text.py``), dropped to "" with probability 0.1 so that classifier-free guidance works.
- Objective: flow matching as ComfyUI samples Wan (``conditioning.py``): x_t = sigma*eps +
  (1-sigma)*z, input cat(x_t, mask, image latent), timestep 1000*sigma, target eps - z. Timesteps:
  u uniform, sigma = shift*u / (1 + (shift-1)*u) with shift 8 (ComfyUI's ``ModelSamplingSD3``), u
  restricted to the range of the phase.
- Phases: a shared warm start on all timesteps, then two copies of it: the high-noise expert on
  t >= 900 (sigma >= 0.9) and the low-noise expert on t < 900 (Wan2.2-I2V's boundary). AdamW,
  linear warm-up then cosine decay per phase, gradient clipping, bf16 autocast on CUDA.
- Budget: ``--minutes`` (default 7) is turned into step counts before training, from a short probe
  of the speed; the counts are printed and logged, and ``--phase-steps W,H,L`` replays them.
- Held-out: ``HELDOUT`` videos with seeds disjoint from training (``data.heldout_seeds``), fixed
  noise and stratified timesteps per expert range; their loss is logged for the untrained model,
  the warm start and each expert, and along training.

- EMA of the weights; each phase keeps the raw or EMA weights, whichever has the lower held-out loss.
- Decoder: after the experts, the learned video decoder (``minimodel/decoder.py``) is trained on
  ground-truth (latent, frames) pairs; most latents are sampled with both trained experts over the
  ``--sample-steps`` schedule (as the demo makes the latents it decodes), the rest are one-step x0
  predictions or perturbed encodings (``DecoderData``; ``--decoder-seconds``, replayed by
  ``--decoder-steps``). ``--decoder-only`` trains just the decoder from the experts already in ``--out``:

      python -m wan_w4a4.apps.mini_train --decoder-only --out DIR --decoder-seconds 210 --force

  The decoder loss is pixel MSE plus ``--decoder-seam`` x ``decoder.seam_penalty`` (block-edge seams).

Writes to ``--out``: ``high_noise.safetensors``, ``low_noise.safetensors`` (bf16, ComfyUI's Wan key
names; ``UNETLoader`` detects them as Wan2.2-I2V), ``decoder.safetensors`` (when trained),
``train_log.json``; then, when ComfyUI's sampler can be imported, the held-out generation metric
(``"generation"`` in ``train_log.json``), ``strips.png`` and ``loss_curve.png`` (``mini_pictures.py``,
also runnable on its own).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from ..kernels import format as fmt
from ..minimodel import EMBEDDED_FILES as EXPERT_FILES
from ..minimodel import conditioning, data, text
from ..minimodel import decoder as mini_decoder
from ..minimodel.arch import TINY, WanArch, wan_state_dict_shapes
from . import mini_pictures as pictures
from . import runtime

logger = logging.getLogger(__name__)

# The mini model's first shape: dim 256 (ComfyUI detects num_heads = dim // 128 = 2), 4 blocks, ffn 768:
# 5.4 M parameters, 10.9 MB per expert in bf16.
MINI = WanArch(dim=256, num_layers=4, ffn_dim=768)
# The shipped experts' shape, grown from MINI ones: the deepest model of that width inside the checkpoint budget,
# 7.2 M parameters, 14.5 MB per expert (minimodel/README.md: Training, Limits).
MINI6 = WanArch(dim=256, num_layers=6, ffn_dim=768)
ARCHS = {"mini": MINI, "mini6": MINI6, "tiny": TINY}

MAX_CHECKPOINT_BYTES = 15_000_000  # each expert <= 15 MB: the embedded default ships in the repository
SIGMA_MIN_U = 1e-3                  # ComfyUI's flow sigmas start at t = 1/1000
DECODER_AUG_SIGMA = 0.4             # decoder augmentation: x0 predictions from sigma in (0, 0.4)
DECODER_SEED_OFFSET = 7_777         # the decoder's training scenes: RandomState(seed + this), training range
HELDOUT_NOISE_SEED = 1234           # fixed noise for the held-out loss


@dataclasses.dataclass
class TrainConfig:
    out: Path
    arch: WanArch = MINI
    device: str = "cpu"
    seed: int = 0
    batch: int = 128
    minutes: float | None = 7.0           # used when neither steps nor phase_steps is given
    steps: int | None = None              # total optimizer steps, split by `fractions`
    phase_steps: tuple[int, int, int] | None = None  # (warm, high, low), replays a plan exactly
    fractions: tuple[float, float, float] = (0.3, 0.3, 0.4)
    lr: float = 4e-4
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    shift: float = 8.0
    boundary: float = 0.9                  # sigma; Wan2.2-I2V: t = 900
    caption_dropout: float = 0.1
    frames: int = data.FRAMES
    chunk: int = 2048                     # videos rendered at once (then served `reuse` times)
    reuse: int = 4
    render_batch: int = 128
    heldout: int = 64
    heldout_sigmas: int = 4               # per video and expert range (stratified)
    eval_points: int = 8                  # held-out evaluations along each phase
    log_every: int = 25
    probe_steps: int = 12                 # speed probe before planning a --minutes budget
    ema: float = 0.998                    # EMA decay of the weights (0: off); each expert keeps the better
                                          # of raw and EMA weights on the held-out loss (both logged)
    decoder_seconds: float | None = None  # learned video decoder: time budget (turned into steps), ...
    decoder_steps: int | None = None      # ... or a step count (replays a run); neither (or 0): no decoder
                                          # (the command line's default on CUDA: 50 s)
    decoder_batch: int = 32
    decoder_lr: float = 2e-3
    decoder_noise: float = 0.5            # max std of the per-latent-pixel Gaussian perturbation of training
                                          # latents: generated latents err block by block (minimodel/strips.png)
    decoder_model_aug: float = 0.5        # fraction of the other decoder batches decoded from the low-noise
                                          # expert's one-step x0 prediction (sigma < DECODER_AUG_SIGMA)
    decoder_sampled: float = 0.6          # fraction of decoder batches whose latents come from multi-step sampling
                                          # with both experts (``sample_latents``), as the demo decodes: one-step
                                          # x0 predictions and Gaussian perturbations do not look like generated
                                          # latents (these shrink the within-block coefficients, leaving seams)
    decoder_seam: float = 0.3             # weight of the block-seam penalty in the decoder loss (decoder.seam_penalty);
                                          # 0.3 lowered the seams of generated frames without costing their PSNR
                                          # in a short CPU fine-tune (minimodel/README.md), 1.0 cost 1 dB
    decoder_only: bool = False            # train only the decoder, from the experts already in `out`
    decoder_init: Path | None = None      # start the decoder from this decoder file instead of the linear decoder
    generation: int = 8                   # held-out scenes sampled for the generation metric (0: none)
    sample_steps: int = 20                # sampling steps of the generation metric and strips
    strips: int = 4                       # held-out scenes in strips.png
    init_experts: Path | None = None      # continue both experts from the checkpoints in this folder (no warm
                                          # start; the steps are split between the experts by `fractions`)
    experts: tuple[str, ...] = ("high", "low")  # which experts train; with one, the run needs init_experts, gives
                                          # it the whole budget and writes the other as it started (so two
                                          # processes on two GPUs can train one each; ``join_expert_runs``)
    compile: bool = False
    pictures: bool = True
    overwrite: bool = False               # replace existing checkpoints/log in `out`

    def __post_init__(self):
        self.out = Path(self.out)
        if self.batch < 1 or self.chunk < self.batch or self.reuse < 1:
            raise ValueError(f"need batch >= 1, chunk >= batch, reuse >= 1; got batch={self.batch}, "
                             f"chunk={self.chunk}, reuse={self.reuse}")
        if not 0 < self.boundary < 1:
            raise ValueError(f"boundary is a sigma in (0, 1), got {self.boundary}")
        if self.phase_steps is not None and (len(self.phase_steps) != 3 or min(self.phase_steps) < 0
                                             or max(self.phase_steps[1:]) < 1):
            raise ValueError(f"phase_steps must be three step counts (warm, high, low), got {self.phase_steps}")
        if self.steps is not None and self.steps < 3:
            raise ValueError(f"steps must be >= 3 (one per phase), got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if abs(sum(self.fractions) - 1) > 1e-6 or min(self.fractions) <= 0:
            raise ValueError(f"fractions must be three positive numbers summing to 1, got {self.fractions}")
        data.latent_frames(self.frames)
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema is a decay in [0, 1), got {self.ema}")
        if self.decoder_steps is not None and self.decoder_steps < 0:
            raise ValueError(f"decoder_steps must be >= 0, got {self.decoder_steps}")
        if self.decoder_seconds is not None and self.decoder_seconds < 0:
            raise ValueError(f"decoder_seconds must be >= 0, got {self.decoder_seconds}")
        if (self.decoder_batch < 1 or not 0 <= self.decoder_model_aug <= 1 or self.decoder_noise < 0
                or not 0 <= self.decoder_sampled <= 1 or self.decoder_seam < 0 or self.decoder_lr <= 0):
            raise ValueError(f"need decoder_batch >= 1, decoder_model_aug and decoder_sampled in [0, 1], "
                             f"decoder_noise >= 0, decoder_seam >= 0, decoder_lr > 0; got {self.decoder_batch}, "
                             f"{self.decoder_model_aug}, {self.decoder_sampled}, {self.decoder_noise}, "
                             f"{self.decoder_seam}, {self.decoder_lr}")
        if self.decoder_init is not None:
            self.decoder_init = Path(self.decoder_init)
            if not self.decoder_init.is_file():
                raise FileNotFoundError(f"decoder_init: no decoder file at {self.decoder_init}")
        if self.init_experts is not None:
            self.init_experts = Path(self.init_experts)
            for fname in EXPERT_FILES.values():  # checked now, not after the probe
                src = expert_arch(self.init_experts / fname)
                if not can_grow(src, self.arch):
                    raise ValueError(f"{self.init_experts / fname}: its architecture {src} is not the one being "
                                     f"trained, {self.arch}, nor a shallower one of the same width to grow from")
            if self.phase_steps is not None and self.phase_steps[0] != 0:
                raise ValueError(f"init_experts continues the experts: the warm start must have 0 steps, "
                                 f"got phase_steps {self.phase_steps}")
        self.experts = tuple(self.experts)
        if not self.experts or len(set(self.experts)) != len(self.experts) or set(self.experts) - {"high", "low"}:
            raise ValueError(f"experts must name 'high' and/or 'low' once each, got {self.experts}")
        if len(self.experts) == 1:
            if self.init_experts is None:
                raise ValueError(f"training only the {self.experts[0]}-noise expert continues it: it needs "
                                 f"init_experts (--init-experts DIR), where the other expert comes from too")
            idle = 2 if self.experts == ("high",) else 1
            if self.phase_steps is not None and self.phase_steps[idle] != 0:
                raise ValueError(f"only the {self.experts[0]}-noise expert trains: the other's phase must have "
                                 f"0 steps, got phase_steps {self.phase_steps}")
        elif self.phase_steps is not None and min(self.phase_steps[1:]) < 1:
            raise ValueError(f"both experts train: each needs at least one step, got phase_steps {self.phase_steps}")
        if self.decoder_only and not (self.decoder_steps or self.decoder_seconds):
            raise ValueError("decoder_only needs a decoder budget: decoder_seconds > 0 or decoder_steps > 0")
        if self.generation < 0 or self.sample_steps < 1 or self.strips < 1:
            raise ValueError(f"need generation >= 0, sample_steps >= 1 and strips >= 1, got {self.generation}, "
                             f"{self.sample_steps}, {self.strips}")


# ---- ComfyUI's WanModel ----------------------------------------------------------------------------
def comfy_wan_modules():
    """``(WanModel class, comfy.ops.disable_weight_init)`` from the ComfyUI tree that
    ``runtime.find_comfyui`` finds. Imports only the model code (not ``nodes``, so neither the
    server nor torchsde is needed)."""
    if "comfy.ldm.wan.model" not in sys.modules:
        root = runtime.find_comfyui()
        if root is None:
            raise runtime.ComfyUINotFound(runtime.not_found_message())
        runtime.install_stand_ins()
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
            from comfy.cli_args import args
            args.cpu = True  # else comfy.model_management looks for a GPU driver
    import comfy.ldm.wan.model
    import comfy.ops
    return comfy.ldm.wan.model.WanModel, comfy.ops.disable_weight_init


def _tensor_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def init_state_dict(arch: WanArch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Wan's own initialisation (``WanModel.init_weights`` of Wan2.1/2.2), one seeded generator per
    tensor: Linear weights xavier-uniform, patch embedding xavier on its flattened kernel, text and
    time embeddings N(0, 0.02^2), output head zero, modulation N(0, 1/dim), biases 0, norm gains 1."""
    out = {}
    for key, shape in wan_state_dict_shapes(arch).items():
        g = torch.Generator().manual_seed(_tensor_seed(seed, key))
        if key.endswith("modulation"):
            t = torch.randn(shape, generator=g) / math.sqrt(arch.dim)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        elif "norm" in key:
            t = torch.ones(shape)
        elif key == "head.head.weight":
            t = torch.zeros(shape)
        elif key.startswith(("text_embedding.", "time_embedding.")):
            t = torch.randn(shape, generator=g) * 0.02
        else:  # block Linears, time_projection, patch_embedding (fan over the flattened kernel)
            fan_out, fan_in = shape[0], math.prod(shape[1:])
            a = math.sqrt(6.0 / (fan_in + fan_out))
            t = (torch.rand(shape, generator=g) * 2 - 1) * a
        out[key] = t
    return out


def build_model(arch: WanArch, seed: int = 0, device="cpu") -> torch.nn.Module:
    """ComfyUI's ``WanModel`` with the Wan2.2-I2V layout, fp32, initialised by ``init_state_dict``."""
    WanModel, ops = comfy_wan_modules()
    model = WanModel(model_type="t2v", patch_size=arch.patch_size, in_dim=arch.in_dim, dim=arch.dim,
                     ffn_dim=arch.ffn_dim, freq_dim=arch.freq_dim, text_dim=arch.text_dim,
                     out_dim=arch.out_dim, num_heads=arch.num_heads, num_layers=arch.num_layers,
                     qk_norm=True, cross_attn_norm=True, eps=1e-6, image_model="wan2.1",
                     device="cpu", dtype=torch.float32, operations=ops)
    state = init_state_dict(arch, seed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ComfyUI's WanModel does not match the Wan2.2-I2V key list of {arch}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device)


def save_checkpoint(model: torch.nn.Module, path, arch: WanArch, metadata: dict) -> dict:
    """Writes the model as a bf16 safetensors file with ComfyUI's Wan key names; returns
    ``{"file", "bytes", "sha256"}``."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    expected = set(wan_state_dict_shapes(arch))
    if set(state) != expected:
        raise RuntimeError(f"{path}: state dict keys differ from the Wan2.2-I2V layout: "
                           f"extra {sorted(set(state) - expected)[:5]}, missing {sorted(expected - set(state))[:5]}")
    meta = {"format": "pt", "wan_w4a4.arch": arch.to_json(),
            **{f"wan_w4a4.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    digest = checkpoint_digest(path)
    if digest["bytes"] > MAX_CHECKPOINT_BYTES:
        logger.warning("%s is %.1f MB, over the %.0f MB budget", path, digest["bytes"] / 1e6,
                       MAX_CHECKPOINT_BYTES / 1e6)
    return digest


def expert_arch(path, expected: WanArch | None = None) -> WanArch:
    """The architecture in a ``save_checkpoint`` file's header (the error names the file); with
    ``expected``: it must be that one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no expert checkpoint at {path}; train one with python -m wan_w4a4.apps.mini_train")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if "wan_w4a4.arch" not in meta:
        raise ValueError(f"{path}: no wan_w4a4.arch in the header (not written by mini_train)")
    try:
        arch = WanArch.from_json(meta["wan_w4a4.arch"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: bad wan_w4a4.arch in the header ({e})") from None
    if expected is not None and arch != expected:
        raise ValueError(f"{path}: its architecture {arch} is not the one being trained, {expected}")
    return arch


def can_grow(src: WanArch, dst: WanArch) -> bool:
    """Whether ``grow_state_dict`` can turn ``src`` into ``dst``: the same model with more blocks."""
    return dataclasses.replace(src, num_layers=dst.num_layers) == dst and dst.num_layers >= src.num_layers


def grown_block_sources(src_layers: int, dst_layers: int) -> list[int]:
    """For each block of the grown model, the trained block it is copied from. The new blocks are spread
    evenly and each follows a copy of the block it duplicates: 4 -> 6 gives [0, 1, 1, 2, 3, 3]."""
    extra = dst_layers - src_layers
    after = [-(-(i + 1) * src_layers // extra) - 1 for i in range(extra)]  # ceil((i+1) src / extra) - 1
    out = []
    for b in range(src_layers):
        out += [b] * (1 + after.count(b))
    return out


# The Linears whose outputs a Wan block adds to its residual stream (ComfyUI's WanAttentionBlock.forward:
# x + gate * self_attn.o(...), x + cross_attn.o(...), x + gate * ffn.2(...)): zeroed, a block is the identity.
RESIDUAL_OUTPUTS = ("self_attn.o", "cross_attn.o", "ffn.2")


def grow_state_dict(state: dict, src: WanArch, dst: WanArch) -> dict:
    """A trained ``src`` state dict as a deeper ``dst`` (depth up-scaling): each new block is a copy of the
    block before it with its residual outputs zeroed, so the grown model computes exactly what ``src`` did
    and training starts from the trained function, with the new blocks' attention and FFN weights as a
    starting point instead of noise."""
    if not can_grow(src, dst):
        raise ValueError(f"cannot grow {src} into {dst}: only num_layers may differ, and only upwards")
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    sources = grown_block_sources(src.num_layers, dst.num_layers)
    for b, source in enumerate(sources):
        fresh = b > 0 and sources[b - 1] == source
        prefix = f"blocks.{source}."
        for k, v in state.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                zero = fresh and name.rsplit(".", 1)[0] in RESIDUAL_OUTPUTS
                out[f"blocks.{b}.{name}"] = torch.zeros_like(v) if zero else v.clone()
    return out


def load_trained_expert(path, device="cpu") -> torch.nn.Module:
    """A checkpoint written by ``save_checkpoint`` as ComfyUI's ``WanModel`` (fp32, eval mode): the
    architecture from its header, every tensor name and shape checked (the error names the file)."""
    from safetensors.torch import load_file

    path = Path(path)
    arch = expert_arch(path)
    state = load_file(str(path))
    expected = wan_state_dict_shapes(arch)
    for key, shape in expected.items():
        if key not in state or tuple(state[key].shape) != tuple(shape):
            got = tuple(state[key].shape) if key in state else "missing"
            raise ValueError(f"{path}: tensor {key} is {got}, expected {tuple(shape)} for {arch}")
    if set(state) != set(expected):
        raise ValueError(f"{path}: unexpected tensors {sorted(set(state) - set(expected))[:5]}")
    model = build_model(arch, device="cpu")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


# ---- timesteps -------------------------------------------------------------------------------------
def shift_sigma(u, shift: float):
    """ComfyUI's ``time_snr_shift``: sigma = shift*u / (1 + (shift-1)*u)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: float, shift: float) -> float:
    return sigma / (shift - (shift - 1) * sigma)


def u_range(sigma_range: tuple[float, float], shift: float) -> tuple[float, float]:
    lo, hi = sigma_range
    return max(unshift_sigma(lo, shift), SIGMA_MIN_U), unshift_sigma(hi, shift)


def phase_ranges(boundary: float) -> dict[str, tuple[float, float]]:
    """Sigma range of each phase: the warm start sees all, the experts split at ``boundary``."""
    return {"warm": (0.0, 1.0), "high": (boundary, 1.0), "low": (0.0, boundary)}


def flow_sigmas(steps: int, shift: float) -> list[float]:
    """ComfyUI's "simple" schedule for a flow model with ``ModelSamplingSD3(shift)``: its sigma table is
    ``shift_sigma(t / 1000)`` for t = 1 .. 1000 and the schedule takes every (1000 / steps)-th entry from the
    top, so step i starts at ``shift_sigma(1 - i / steps)``; then 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [float(shift_sigma(1 - i / steps, shift)) for i in range(steps)] + [0.0]


# ---- data ------------------------------------------------------------------------------------------
def render_latents(scenes, frames: int, device, vae: data.LinearVideoVAE, render_batch: int = 128):
    """Normalised latents z ``[N, 16, F, h, w]`` of ``scenes``, rendered ``render_batch`` at a time."""
    parts = []
    for i in range(0, len(scenes), render_batch):
        parts.append(vae.encode_normalized(data.render(scenes[i:i + render_batch], frames, device=device)))
    return torch.cat(parts)


class VideoStream:
    """Training videos: renders ``chunk`` fresh scenes (seeds from ``RandomState(seed)``, all below
    ``data.TRAIN_SEED_LIMIT``) on the device, serves each ``reuse`` times in shuffled batches (with
    fresh noise and timesteps each time), then renders the next chunk."""

    def __init__(self, seed: int, cfg: TrainConfig, vae: data.LinearVideoVAE):
        self.rng = np.random.RandomState(seed)
        self.cfg, self.vae = cfg, vae
        self.z = None
        self.captions: list[str] = []
        self.order: list[np.ndarray] = []
        self.render_seconds = 0.0
        self.videos = 0

    def _refill(self):
        t0 = time.perf_counter()
        seeds = self.rng.randint(0, data.TRAIN_SEED_LIMIT, size=self.cfg.chunk)
        scenes = [data.sample_scene(int(s)) for s in seeds]
        self.captions = [data.caption(s) for s in scenes]
        self.z = render_latents(scenes, self.cfg.frames, self.cfg.device, self.vae, self.cfg.render_batch)
        n, b = self.cfg.chunk, self.cfg.batch
        idx = np.concatenate([self.rng.permutation(n) for _ in range(self.cfg.reuse)])
        self.order = [idx[i:i + b] for i in range(0, len(idx) - b + 1, b)][::-1]
        if self.cfg.device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.render_seconds += time.perf_counter() - t0
        self.videos += n

    def next(self):
        """``(z [B, 16, F, h, w], captions)``."""
        if not self.order:
            self._refill()
        idx = self.order.pop()
        return self.z[torch.from_numpy(idx).to(self.z.device)], [self.captions[i] for i in idx]


def image_latent_from(z: torch.Tensor) -> torch.Tensor:
    """What ``WanImageToVideo`` encodes for the first frame of the video of latent ``z``: latent
    frame 0 of z and zeros (mid-grey frames encode to exactly 0). Equals
    ``conditioning.image_latent(vae, pixels[:, 0])`` (tested)."""
    img = torch.zeros_like(z)
    img[:, :, :1] = z[:, :, :1]
    return img


def training_input(z, noise, sigma, mask):
    """The 36-channel model input and the velocity target for latents ``z`` at ``sigma`` [B]."""
    x_t = conditioning.noisy(z, noise, sigma)
    return conditioning.model_input(x_t, image_latent_from(z), mask), noise - z


# ---- held-out --------------------------------------------------------------------------------------
class HeldOut:
    """Fixed held-out videos (seeds ``data.heldout_seeds``), noise and per-range stratified sigmas."""

    def __init__(self, cfg: TrainConfig, vae, encoder: text.TextEncoder):
        scenes = [data.sample_scene(s) for s in data.heldout_seeds(cfg.heldout)]
        self.cfg = cfg
        self.z = render_latents(scenes, cfg.frames, cfg.device, vae, cfg.render_batch)
        self.context = encoder.encode([data.caption(s) for s in scenes])
        k = cfg.heldout_sigmas
        g = torch.Generator().manual_seed(HELDOUT_NOISE_SEED)
        self.noise = torch.randn((k, *self.z.shape), generator=g).to(self.z.device)
        self.strata = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        self.mask = conditioning.start_mask(self.z.shape[2], *self.z.shape[3:], device=self.z.device)

    def sigmas(self, sigma_range) -> torch.Tensor:
        u0, u1 = u_range(sigma_range, self.cfg.shift)
        return shift_sigma(u0 + (u1 - u0) * self.strata, self.cfg.shift).float()

    @torch.no_grad()
    def loss(self, model, sigma_range) -> dict:
        """``{"loss": mean MSE, "per_sigma": [[sigma, mse], ...]}`` over the held-out set."""
        was_training = model.training
        model.eval()
        per = []
        n, b = self.z.shape[0], self.cfg.batch
        for j, sigma in enumerate(self.sigmas(sigma_range).tolist()):
            total = 0.0
            for i in range(0, n, b):
                z = self.z[i:i + b]
                s = torch.full((z.shape[0],), sigma, device=z.device)
                x, target = training_input(z, self.noise[j, i:i + b], s, self.mask)
                with _autocast(self.cfg.device):
                    v = model(x, s * 1000.0, self.context[i:i + b])
                total += torch.nn.functional.mse_loss(v.float(), target, reduction="sum").item()
            per.append([round(sigma, 5), total / self.z[0].numel() / n])
        model.train(was_training)
        return {"loss": float(np.mean([p[1] for p in per])), "per_sigma": per}


@contextlib.contextmanager
def comfy_in_training():
    """Sets ``comfy.model_management.in_training`` for a forward that will be back-propagated.

    Newer ComfyUI (0.33) runs Wan's rope through a comfy-kitchen op that has no backward unless this
    flag is True (``comfy/ldm/flux/math.py`` ``apply_rope1``); 0.3.64 has no such flag and ignores
    it. The previous value is restored (the attribute is removed again where it did not exist).
    """
    mm = sys.modules.get("comfy.model_management")
    if mm is None:  # ComfyUI's model code not imported: nothing reads the flag
        yield
        return
    missing = object()
    was = getattr(mm, "in_training", missing)
    mm.in_training = True
    try:
        yield
    finally:
        if was is missing:
            del mm.in_training
        else:
            mm.in_training = was


def _autocast(device: str):
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ---- training --------------------------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up over min(warmup, total/10) steps, then cosine decay to 10% of the peak."""
    warm = max(1, min(cfg.warmup, total // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.shape[0] != 1]
    rest = [p for p in model.parameters() if not (p.ndim >= 2 and p.shape[0] != 1)]
    kw = {"fused": True} if str(cfg.device).startswith("cuda") else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99), **kw)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.vae = data.LinearVideoVAE()
        self.encoder = text.TextEncoder(cfg.device)
        self.rng = np.random.RandomState(cfg.seed + 17)          # caption dropout
        self.gen = torch.Generator(cfg.device).manual_seed(cfg.seed + 29)  # noise and timesteps
        self.stream = VideoStream(cfg.seed, cfg, self.vae)
        lat_f = data.latent_frames(cfg.frames)
        self.mask = conditioning.start_mask(lat_f, data.HEIGHT // data.SPATIAL, data.WIDTH // data.SPATIAL,
                                            device=cfg.device)
        self.tokens_per_sample = lat_f * (data.HEIGHT // 16) * (data.WIDTH // 16)
        self.curve: list[dict] = []
        self.heldout_curve: list[dict] = []
        self.global_step = 0
        self.t_start = time.perf_counter()

    def step(self, model, opt, sigma_range, lr: float, forward=None) -> torch.Tensor:
        """One optimizer step on a fresh batch; ``forward`` is ``model`` or its compiled version."""
        cfg = self.cfg
        z, caps = self.stream.next()
        drop = self.rng.rand(len(caps)) < cfg.caption_dropout
        ctx = self.encoder.encode(["" if d else c for d, c in zip(drop, caps)])
        u0, u1 = u_range(sigma_range, cfg.shift)
        u = u0 + (u1 - u0) * torch.rand(z.shape[0], generator=self.gen, device=z.device)
        sigma = shift_sigma(u, cfg.shift)
        noise = torch.randn(z.shape, generator=self.gen, device=z.device)
        x, target = training_input(z, noise, sigma, self.mask)
        for group in opt.param_groups:
            group["lr"] = lr
        with comfy_in_training(), _autocast(cfg.device):
            v = (forward or model)(x, sigma * 1000.0, ctx)
        loss = torch.nn.functional.mse_loss(v.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return loss.detach()

    def probe(self, model, n: int = 12) -> dict:
        """Seconds per training step (compute, on a throwaway copy) and per rendered video."""
        cfg = self.cfg
        m = copy.deepcopy(model)
        opt = make_optimizer(m, cfg)
        saved = (self.stream, self.rng.get_state(), self.gen.get_state())
        self.stream = VideoStream(cfg.seed + 99991, dataclasses.replace(cfg, chunk=max(cfg.batch, min(cfg.chunk, 4 * cfg.batch)), reuse=n), self.vae)
        self.stream.next()  # renders the probe's chunk (timed separately)
        times = []
        for i in range(n):
            _sync(cfg.device)
            t0 = time.perf_counter()
            self.step(m, opt, (0.0, 1.0), cfg.lr * 0.1).item()
            times.append(time.perf_counter() - t0)
        render = self.stream.render_seconds / max(1, self.stream.videos)
        self.stream, rng_state, gen_state = saved
        self.rng.set_state(rng_state)
        self.gen.set_state(gen_state)
        step_s = float(np.median(times[min(n - 1, max(1, n // 3)):]))
        del m, opt
        return {"step_s": step_s, "render_s_per_video": render,
                "effective_step_s": step_s + render * cfg.batch / cfg.reuse}

    def run_phase(self, name, model, steps: int, sigma_range, heldout: HeldOut, eval_ranges: dict,
                  forward=None, ema: Ema | None = None):
        cfg = self.cfg
        if steps <= 0:
            return
        opt = make_optimizer(model, cfg)
        every = max(1, steps // max(1, cfg.eval_points))
        acc, n_acc = torch.zeros((), device=cfg.device), 0
        t0 = time.perf_counter()
        try:
            from tqdm import tqdm
            # a log file (not a terminal) gets a line every 15 s instead of a redraw every 0.1 s
            bar = tqdm(total=steps, desc=f"{name:>4}", unit="step", dynamic_ncols=True,
                       mininterval=0.5 if sys.stderr.isatty() else 15.0)
        except ImportError:  # pragma: no cover
            bar = None
        for i in range(steps):
            lr = lr_at(i, steps, cfg)
            acc += self.step(model, opt, sigma_range, lr, forward)
            if ema is not None:
                ema.update()
            n_acc += 1
            self.global_step += 1
            last = i == steps - 1
            if n_acc == cfg.log_every or last:
                loss = (acc / n_acc).item()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{name} phase: training loss is {loss} at step {i}")
                self.curve.append({"phase": name, "step": i + 1, "global_step": self.global_step,
                                   "time_s": round(time.perf_counter() - self.t_start, 2),
                                   "lr": lr, "loss": loss})
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
                acc.zero_()
                n_acc = 0
            if (i + 1) % every == 0 or last:
                for rname, rng_ in eval_ranges.items():
                    r = heldout.loss(model, rng_)
                    self.heldout_curve.append({"phase": name, "step": i + 1, "global_step": self.global_step,
                                               "range": rname, "loss": r["loss"]})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        _sync(cfg.device)
        dt = time.perf_counter() - t0
        logger.info("%s phase: %d steps in %.1f s (%.2f steps/s, %.0f samples/s, %.0f tokens/s)", name, steps,
                    dt, steps / dt, steps * cfg.batch / dt, steps * cfg.batch * self.tokens_per_sample / dt)
        return {"steps": steps, "seconds": round(dt, 2), "steps_per_s": steps / dt,
                "samples_per_s": steps * cfg.batch / dt,
                "tokens_per_s": steps * cfg.batch * self.tokens_per_sample / dt}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Ema:
    """Exponential moving average of a model's floating-point state: decay ``min(decay, (1 + n) / (10 + n))``
    after n updates (the warm-up keeps the first steps from dominating a short phase)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.n = decay, 0
        live = model.state_dict()  # views of the model's tensors, updated in place by the optimizer
        self.state = {k: v.detach().clone() for k, v in live.items()}
        keys = [k for k, v in live.items() if v.is_floating_point()]
        self._avg, self._live = [self.state[k] for k in keys], [live[k] for k in keys]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self._avg, self._live, 1 - d)
        self.n += 1


def keep_better(model, ema: Ema | None, heldout: HeldOut, sigma_range) -> dict:
    """Loads the EMA weights into ``model`` if their held-out loss on ``sigma_range`` is lower than the raw
    weights'; returns ``{"raw": loss, "ema": loss or None, "kept": "raw" | "ema"}``."""
    raw = heldout.loss(model, sigma_range)["loss"]
    if ema is None:
        return {"raw": raw, "ema": None, "kept": "raw"}
    saved = copy.deepcopy(model.state_dict())
    model.load_state_dict(ema.state)
    averaged = heldout.loss(model, sigma_range)["loss"]
    if averaged >= raw:
        model.load_state_dict(saved)
    return {"raw": raw, "ema": averaged, "kept": "ema" if averaged < raw else "raw"}


# ---- the learned video decoder -----------------------------------------------------------------------
@torch.no_grad()
def sample_latents(experts: dict, z: torch.Tensor, noise: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor,
                   sigmas: list[float], start: int, boundary: float, device) -> torch.Tensor:
    """Euler sampling as the two ``KSamplerAdvanced`` of ``mini_sample.sample_two_expert`` do it (cfg 1):
    from the latents ``z`` noised to ``sigmas[start]`` (start 0 is sigma 1: pure noise, a whole generation)
    down to 0, each step by ``experts["high"]`` while its sigma >= ``boundary``, else by ``experts["low"]``,
    conditioned as ``WanImageToVideo`` does on the first latent frame of ``z`` and on the captions ``ctx``.
    Returns the sampled latents, what the demo hands the decoder."""
    B = z.shape[0]
    x = conditioning.noisy(z, noise, torch.full((B,), sigmas[start], device=z.device))
    img = image_latent_from(z)
    for i in range(start, len(sigmas) - 1):
        s = torch.full((B,), sigmas[i], device=z.device)
        expert = experts["high"] if sigmas[i] >= boundary else experts["low"]
        with _autocast(device):
            v = expert(conditioning.model_input(x, img, mask), s * 1000.0, ctx)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()  # ComfyUI's euler: d = (x - denoised) / sigma = v
    return x


class DecoderData:
    """Ground-truth (latent, frames) batches for the decoder: fresh training-range scenes rendered on the
    device and, as the input latents, per batch one of
    - with probability ``decoder_sampled``: ``sample_latents`` with both experts from the true latent noised
      to a sigma of the ``sample_steps`` schedule drawn uniformly (the first is 1: a whole generation from
      the start frame and caption, what the demo decodes; later ones stay closer to the rendered video);
    - else, with probability ``decoder_model_aug``: the low-noise expert's one-step x0 prediction at a random
      sigma < ``DECODER_AUG_SIGMA``;
    - else the linear encoding perturbed by Gaussian noise (``decoder.perturb``).
    Without ``experts`` every batch is perturbed."""

    def __init__(self, cfg: TrainConfig, vae: data.LinearVideoVAE, encoder: text.TextEncoder,
                 experts: dict | None = None):
        self.cfg, self.vae, self.encoder, self.experts = cfg, vae, encoder, experts
        self.rng = np.random.RandomState(cfg.seed + DECODER_SEED_OFFSET)
        self.gen = torch.Generator(cfg.device).manual_seed(cfg.seed + DECODER_SEED_OFFSET)
        self.mask = conditioning.start_mask(data.latent_frames(cfg.frames), data.HEIGHT // data.SPATIAL,
                                            data.WIDTH // data.SPATIAL, device=cfg.device)
        self.sigmas = flow_sigmas(cfg.sample_steps, cfg.shift)
        self.counts = {"sampled": 0, "x0": 0, "perturbed": 0}

    @torch.no_grad()
    def next(self):
        """``(z_in [B, 16, F, h, w], frames [B, T, H, W, 3])``."""
        cfg = self.cfg
        seeds = self.rng.randint(0, data.TRAIN_SEED_LIMIT, size=cfg.decoder_batch)
        scenes = [data.sample_scene(int(s)) for s in seeds]
        frames = data.render(scenes, cfg.frames, device=cfg.device)
        z = self.vae.encode_normalized(frames)
        r = self.rng.rand()
        if self.experts is not None and r < cfg.decoder_sampled:
            self.counts["sampled"] += 1
            start = int(self.rng.randint(0, cfg.sample_steps))
            noise = torch.randn(z.shape, generator=self.gen, device=z.device)
            ctx = self.encoder.encode([data.caption(s) for s in scenes])
            return sample_latents(self.experts, z, noise, ctx, self.mask, self.sigmas, start, cfg.boundary,
                                  cfg.device), frames
        if self.experts is not None and self.rng.rand() < cfg.decoder_model_aug:
            self.counts["x0"] += 1
            sigma = torch.rand(z.shape[0], generator=self.gen, device=z.device) * DECODER_AUG_SIGMA
            noise = torch.randn(z.shape, generator=self.gen, device=z.device)
            x, _ = training_input(z, noise, sigma, self.mask)
            ctx = self.encoder.encode([data.caption(s) for s in scenes])
            with _autocast(cfg.device):
                v = self.experts["low"](x, sigma * 1000.0, ctx)
            x_t = conditioning.noisy(z, noise, sigma)
            return x_t - sigma.view(-1, 1, 1, 1, 1) * v.float(), frames
        self.counts["perturbed"] += 1
        return mini_decoder.perturb(z, cfg.decoder_noise, self.gen), frames


@torch.no_grad()
def decoder_heldout(dec, vae, frames: torch.Tensor, z: torch.Tensor, noise: float, batch: int) -> dict:
    """Pixel-space PSNR (dB) on held-out videos of the learned and the linear decoding, from the clean
    latents and from latents perturbed by Gaussian noise of std ``noise`` (fixed seed)."""
    g = torch.Generator().manual_seed(HELDOUT_NOISE_SEED)
    z_noisy = z + noise * torch.randn(z.shape, generator=g).to(z.device)
    out = {}
    was = dec.training
    dec.eval()
    for name, zz in (("clean", z), ("perturbed", z_noisy)):
        se = {"learned": 0.0, "linear": 0.0}
        seams = {"learned": [], "linear": []}
        for i in range(0, z.shape[0], batch):
            gt = frames[i:i + batch].float()
            learned = dec(zz[i:i + batch])
            lin = mini_decoder.hold_frames(vae.decode_normalized(zz[i:i + batch]))
            for k, video in (("learned", learned), ("linear", lin)):
                se[k] += ((video - gt) ** 2).mean().item() * gt.shape[0]
                seams[k].append(torch.stack(mini_decoder.block_diffs(video), 1).cpu())
        for k, v in se.items():
            out[f"{k}_{name}_psnr_db"] = 10 * math.log10(1.0 / max(v / z.shape[0], 1e-12))
            edge, inside = torch.cat(seams[k]).mean(0).tolist()
            out[f"{k}_{name}_seam_ratio"] = edge / max(inside, 1e-12)
    out["truth_seam_ratio"] = mini_decoder.seam_ratio(frames)
    dec.train(was)
    out["perturbation_std"] = noise
    return out


DECODER_PROBE = (5, 20)  # a time budget is planned at step 20 from the speed of steps 5..19: the first steps
                         # (CUDA warm-up) ran 2.7x slower on the H200 and made the old plan stop at 19 s of 50


def train_decoder(cfg: TrainConfig, vae, encoder, experts: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Trains ``decoder.VideoDecoder`` (from ``cfg.decoder_init`` when given, else from the linear decoder)
    for ``cfg.decoder_steps`` steps, or as many as fit in ``cfg.decoder_seconds`` (planned from the speed
    of steps ``DECODER_PROBE``); AdamW, warm-up then cosine decay. ``experts`` ``{"high", "low"}``: the
    trained denoisers that make the training latents (``DecoderData``)."""
    torch.manual_seed(cfg.seed + DECODER_SEED_OFFSET)
    if cfg.decoder_init is not None:
        dec = mini_decoder.load_decoder(cfg.decoder_init, cfg.device).train()
        logger.info("decoder: starting from %s", cfg.decoder_init)
    else:
        dec = mini_decoder.VideoDecoder().to(cfg.device)
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    feed = DecoderData(cfg, vae, encoder, experts)
    dcfg = dataclasses.replace(cfg, lr=cfg.decoder_lr, warmup=50)
    skip, probe = DECODER_PROBE
    total = cfg.decoder_steps if cfg.decoder_steps is not None else None
    t0 = time.perf_counter()
    t_skip = t0
    curve, acc, n_acc, step = [], 0.0, 0, 0
    while total is None or step < total:
        if total is None and step == skip:
            _sync(cfg.device)
            t_skip = time.perf_counter()
        if total is None and step == probe:  # plan the rest of the time budget from the steps after warm-up
            _sync(cfg.device)
            now = time.perf_counter()
            per = (now - t_skip) / (probe - skip)
            total = max(probe, probe + int((cfg.decoder_seconds - (now - t0)) / per))
            logger.info("decoder: %.1f ms/step -> %d steps in %.0f s (replay with --decoder-steps %d)",
                        per * 1e3, total, cfg.decoder_seconds, total)
            continue
        lr = lr_at(step, total or 10 * probe, dcfg)
        for group in opt.param_groups:
            group["lr"] = lr
        z_in, frames = feed.next()
        with _autocast(cfg.device):
            loss = mini_decoder.decoder_loss(dec, z_in, frames, cfg.decoder_seam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), cfg.grad_clip)
        opt.step()
        acc += loss.item()
        n_acc += 1
        step += 1
        if n_acc == cfg.log_every or (total is not None and step == total):
            curve.append({"step": step, "loss": acc / n_acc, "lr": lr})
            if not math.isfinite(acc):
                raise FloatingPointError(f"decoder training: loss {acc / n_acc} at step {step}")
            acc, n_acc = 0.0, 0
    _sync(cfg.device)
    dt = time.perf_counter() - t0
    logger.info("decoder: %d steps in %.1f s (batches: %s)", step, dt, feed.counts)
    return dec.eval(), {"steps": step, "seconds": round(dt, 2), "batch": cfg.decoder_batch,
                        "batches": dict(feed.counts), "sampled_fraction": cfg.decoder_sampled,
                        "seam_weight": cfg.decoder_seam, "lr": cfg.decoder_lr,
                        "sample_steps": cfg.sample_steps,
                        "init": str(cfg.decoder_init) if cfg.decoder_init is not None else None,
                        "curve": curve, "config": dataclasses.asdict(dec.config)}


def fit_decoder(cfg: TrainConfig, vae, encoder, heldout_z: torch.Tensor, experts: dict) -> dict:
    """``train_decoder``, its held-out PSNR (``decoder_heldout`` on the videos of ``heldout_z``) and
    ``out/decoder.safetensors`` (replacing one there: callers check ``out`` before training starts).
    Returns the decoder's log."""
    dec, log = train_decoder(cfg, vae, encoder, experts)
    scenes = [data.sample_scene(s) for s in data.heldout_seeds(heldout_z.shape[0])]
    frames = torch.cat([data.render(scenes[i:i + cfg.render_batch], cfg.frames, device=cfg.device)
                        for i in range(0, len(scenes), cfg.render_batch)])
    log["heldout"] = decoder_heldout(dec, vae, frames, heldout_z, cfg.decoder_noise / 2, cfg.decoder_batch)
    del frames
    log["file"] = mini_decoder.save_decoder(
        dec, cfg.out / mini_decoder.DECODER_FILE,
        {"steps": log["steps"], "seed": cfg.seed, "made_by": "python -m wan_w4a4.apps.mini_train"}, overwrite=True)
    logger.info("decoder held-out PSNR: learned %.2f dB (linear %.2f dB) from clean latents; %.2f dB (linear "
                "%.2f dB) from perturbed ones", *(log["heldout"][k] for k in (
                    "learned_clean_psnr_db", "linear_clean_psnr_db", "learned_perturbed_psnr_db",
                    "linear_perturbed_psnr_db")))
    return log


def decoder_replay(cfg: TrainConfig, steps: int) -> str:
    """The command-line options that replay a decoder run of ``steps`` steps."""
    return (f"--decoder-steps {steps} --decoder-batch {cfg.decoder_batch} --decoder-sampled {cfg.decoder_sampled:g} "
            f"--decoder-seam {cfg.decoder_seam:g} --decoder-lr {cfg.decoder_lr:g} --sample-steps {cfg.sample_steps}")


def train_decoder_only(cfg: TrainConfig) -> dict:
    """Trains only the decoder, from the experts already in ``cfg.out`` (``high_noise.safetensors``,
    ``low_noise.safetensors``, as shipped in ``minimodel/``), and writes ``cfg.out/decoder.safetensors``;
    when ``cfg.out/train_log.json`` exists, its ``"decoder"`` entry is replaced (and the experts' log kept).
    An existing decoder is replaced only with ``cfg.overwrite``. Returns the decoder's log."""
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    paths = {k: cfg.out / EXPERT_FILES[k] for k in ("high", "low")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--decoder-only trains from the experts in --out: missing {', '.join(missing)}")
    target = cfg.out / mini_decoder.DECODER_FILE
    if target.exists() and not cfg.overwrite:
        raise FileExistsError(f"{target} exists; pass --force (TrainConfig.overwrite=True) to replace it")
    log_path = cfg.out / "train_log.json"
    log = None
    if log_path.is_file():
        try:
            log = json.loads(log_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{log_path}: not a readable training log ({e}); move it away to train the decoder "
                             f"without it") from None
        if not isinstance(log, dict):
            raise ValueError(f"{log_path}: not a training log (a JSON object expected)")
        frames = int(log.get("config", {}).get("frames", cfg.frames))
        if frames != cfg.frames:
            raise ValueError(f"{log_path}: the experts were trained on {frames}-frame clips, not --frames "
                             f"{cfg.frames}")
    experts = {k: load_trained_expert(p, cfg.device) for k, p in paths.items()}
    vae, encoder = data.LinearVideoVAE(), text.TextEncoder(cfg.device)
    heldout_z = render_latents([data.sample_scene(s) for s in data.heldout_seeds(cfg.heldout)], cfg.frames,
                               cfg.device, vae, cfg.render_batch)
    dec_log = fit_decoder(cfg, vae, encoder, heldout_z, experts)
    dec_log["replay"] = f"--decoder-only {decoder_replay(cfg, dec_log['steps'])} --seed {cfg.seed}"
    dec_log["environment"] = {"device": _device_name(cfg.device), "torch": torch.__version__,
                              "comfyui": _comfyui_version()}
    dec_log["wall_s"] = round(time.perf_counter() - t0, 1)
    if log is not None:
        log["decoder"] = dec_log
        log.pop("generation", None)  # measured with the previous decoder; mini_pictures measures it again
        fmt.write_bytes(log_path, json.dumps(log, indent=1).encode(), overwrite=True)
    logger.info("wrote %s%s in %.1f s", target, f" and the decoder entry of {log_path}" if log else "",
                dec_log["wall_s"])
    return dec_log


def plan_steps(cfg: TrainConfig, probe: dict | None, eval_s: float, spent_s: float) -> tuple[int, int, int]:
    if cfg.phase_steps is not None:
        return tuple(int(s) for s in cfg.phase_steps)
    if cfg.steps is not None:
        total = cfg.steps
    else:
        evals = cfg.eval_points * 4 + 12  # warm evaluates both ranges; raw vs EMA and final losses
        budget = cfg.minutes * 60 - spent_s - evals * eval_s - 15  # 15 s: checkpoints and slack
        total = max(3, int(budget / probe["effective_step_s"]))
    if len(cfg.experts) == 1:  # one expert continues alone: it takes the whole budget
        return (0, total, 0) if cfg.experts == ("high",) else (0, 0, total)
    if cfg.init_experts is not None:  # no warm start: the experts share the steps in their ratio
        fh, fl = cfg.fractions[1:]
        h = max(1, round(total * fh / (fh + fl)))
        return 0, h, max(1, total - h)
    w, h = (max(1, round(total * f)) for f in cfg.fractions[:2])
    return w, h, max(1, total - w - h)


def train(cfg: TrainConfig) -> dict:
    """Runs the whole recipe; returns the log (also written to ``cfg.out / "train_log.json"``)."""
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    existing = [cfg.out / f for f in [*EXPERT_FILES.values(), mini_decoder.DECODER_FILE, "train_log.json"]
                if (cfg.out / f).exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --force (TrainConfig.overwrite=True) to replace "
                              f"it, or choose another --out")
    cfg.out.mkdir(parents=True, exist_ok=True)
    # read before anything is written: with --force, --out may be the folder the experts come from
    lineage = continued_from(cfg.init_experts)
    tr = Trainer(cfg)
    model = build_model(cfg.arch, cfg.seed, cfg.device)
    forward = torch.compile(model) if cfg.compile else model
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %s, %.2f M parameters; device %s; batch %d x %d tokens", cfg.arch, n_params / 1e6,
                cfg.device, cfg.batch, tr.tokens_per_sample)
    ranges = phase_ranges(cfg.boundary)
    expert_ranges = {"high": ranges["high"], "low": ranges["low"]}

    heldout = HeldOut(cfg, tr.vae, tr.encoder)
    untrained = {k: heldout.loss(model, r) for k, r in expert_ranges.items()}
    probe, eval_s = None, 0.0
    if cfg.phase_steps is None and cfg.steps is None:  # a time budget: measure, then plan
        probe = tr.probe(model, cfg.probe_steps)
        _sync(cfg.device)
        t0 = time.perf_counter()  # one held-out evaluation, timed after the warm-up of the probe
        heldout.loss(model, expert_ranges["high"])
        _sync(cfg.device)
        eval_s = probe["eval_s"] = time.perf_counter() - t0
        logger.info("probe: %.1f ms/step compute, %.2f ms/video render -> %.1f steps/s, %.0f samples/s, "
                    "%.0f k tokens/s; held-out evaluation %.2f s", probe["step_s"] * 1e3,
                    probe["render_s_per_video"] * 1e3, 1 / probe["effective_step_s"],
                    cfg.batch / probe["effective_step_s"],
                    cfg.batch * tr.tokens_per_sample / probe["effective_step_s"] / 1e3, eval_s)
    plan = plan_steps(cfg, probe, eval_s, time.perf_counter() - t_start)
    logger.info("plan: warm start %d, high-noise %d, low-noise %d steps (replay with --phase-steps %s)",
                *plan, ",".join(map(str, plan)))

    phases = {}
    def new_ema():
        return Ema(model, cfg.ema) if cfg.ema > 0 else None

    ema = new_ema()
    phases["warm"] = tr.run_phase("warm", model, plan[0], ranges["warm"], heldout, expert_ranges, forward, ema)
    if phases["warm"] is not None:
        phases["warm"]["weights"] = keep_better(model, ema, heldout, ranges["warm"])
    if cfg.init_experts is None:
        warm_loss = {k: heldout.loss(model, r) for k, r in expert_ranges.items()}
        starts = dict.fromkeys(expert_ranges, copy.deepcopy(model.state_dict()))
    else:  # each expert starts from its checkpoint; "warm_start" in the log is that starting point
        starts = {}
        for k in expert_ranges:
            given = load_trained_expert(cfg.init_experts / EXPERT_FILES[k])
            src = expert_arch(cfg.init_experts / EXPERT_FILES[k])
            starts[k] = grow_state_dict(given.state_dict(), src, cfg.arch)
            if src != cfg.arch:
                logger.info("%s expert grown from %d to %d blocks (new blocks copy blocks %s, residual outputs "
                            "zeroed)", k, src.num_layers, cfg.arch.num_layers,
                            grown_block_sources(src.num_layers, cfg.arch.num_layers))
        warm_loss = {}
        for k, r in expert_ranges.items():
            model.load_state_dict(starts[k])
            warm_loss[k] = heldout.loss(model, r)
    results, checkpoints = {}, {}
    for name, steps in (("high", plan[1]), ("low", plan[2])):
        model.load_state_dict(starts[name])
        trained = name in cfg.experts
        if trained:
            ema = new_ema()
            phases[name] = tr.run_phase(name, model, steps, ranges[name], heldout, {name: ranges[name]}, forward, ema)
            phases[name]["weights"] = keep_better(model, ema, heldout, ranges[name])
            del ema
            results[name] = heldout.loss(model, ranges[name])
        else:  # written as it started, so that --out holds a whole model
            phases[name], results[name] = None, warm_loss[name]
        meta = {"expert": f"{name}_noise", "boundary_t": round(cfg.boundary * 1000),
                "sigma_range": list(ranges[name]), "shift": cfg.shift, "steps": {"warm": plan[0], name: steps},
                "seed": cfg.seed,
                "made_by": "python -m wan_w4a4.apps.mini_train" + ("" if trained else " (not trained in this run)"),
                **({"continued_from": lineage["experts"][name]} if lineage is not None else {})}
        checkpoints[name] = save_checkpoint(model, cfg.out / EXPERT_FILES[name], cfg.arch, meta)
    del starts

    decoder_log = None
    if cfg.decoder_steps != 0 and (cfg.decoder_steps is not None or cfg.decoder_seconds):
        del model, forward
        # the experts as written (bf16 weights), as the demo samples them
        experts = {k: load_trained_expert(cfg.out / EXPERT_FILES[k], cfg.device) for k in ("high", "low")}
        decoder_log = fit_decoder(cfg, tr.vae, tr.encoder, heldout.z, experts)

    heldout_summary = {
        name: {"untrained": untrained[name]["loss"], "warm_start": warm_loss[name]["loss"],
               "trained": results[name]["loss"],
               "ratio_trained_to_untrained": results[name]["loss"] / untrained[name]["loss"],
               "per_sigma": {"untrained": untrained[name]["per_sigma"], "warm_start": warm_loss[name]["per_sigma"],
                             "trained": results[name]["per_sigma"]}}
        for name in expert_ranges}
    log = {
        "what": "mini Wan2.2-I2V two-expert model, trained by wan_w4a4.apps.mini_train",
        "arch": dataclasses.asdict(cfg.arch), "parameters": n_params,
        "config": {k: (str(v) if isinstance(v, Path) else (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v))
                   for k, v in dataclasses.asdict(cfg).items()},
        "replay": " ".join([f"--arch {next((k for k, a in ARCHS.items() if a == cfg.arch), 'mini')}",
                            f"--phase-steps {','.join(map(str, plan))}", f"--seed {cfg.seed}",
                            f"--batch {cfg.batch}", f"--lr {cfg.lr:g}", f"--frames {cfg.frames}",
                            f"--chunk {cfg.chunk}", f"--reuse {cfg.reuse}", f"--heldout {cfg.heldout}",
                            f"--heldout-sigmas {cfg.heldout_sigmas}",
                            f"--ema {cfg.ema:g}", decoder_replay(cfg, (decoder_log or {}).get("steps", 0)),
                            *(["--init-experts DIR0"] if cfg.init_experts is not None else []),
                            *([f"--expert {cfg.experts[0]}"] if len(cfg.experts) == 1 else [])]),
        "continued_from": lineage,
        "environment": {"device": _device_name(cfg.device), "torch": torch.__version__,
                        "python": platform.python_version(), "comfyui": _comfyui_version()},
        "plan": {"warm": plan[0], "high": plan[1], "low": plan[2]}, "probe": probe,
        "phases": phases,
        "data": {"videos_rendered": tr.stream.videos, "render_seconds": round(tr.stream.render_seconds, 2),
                 "tokens_per_sample": tr.tokens_per_sample, "frames": cfg.frames,
                 "latent_shape": list(heldout.z.shape[1:]), "heldout_seeds": [data.HELDOUT_SEED_BASE,
                                                                             data.HELDOUT_SEED_BASE + cfg.heldout - 1]},
        "heldout": heldout_summary,
        "curve": tr.curve, "heldout_curve": tr.heldout_curve,
        "checkpoints": checkpoints,
        "decoder": decoder_log,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    (cfg.out / "train_log.json").write_text(json.dumps(log, indent=1))
    for name, h in heldout_summary.items():
        logger.info("held-out loss, %s-noise range: untrained %.4f, warm start %.4f, trained %.4f (x%.3f)",
                    name, h["untrained"], h["warm_start"], h["trained"], h["ratio_trained_to_untrained"])
    logger.info("wrote %s in %.1f s", ", ".join(str(cfg.out / f) for f in [*EXPERT_FILES.values(), "train_log.json"]),
                log["wall_s"])
    return log


def checkpoint_digest(path) -> dict:
    path = Path(path)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def continued_from(folder: Path | None) -> dict | None:
    """What a continued run started from (DIR0 in its replay): the experts' digests and, when that folder has
    its ``train_log.json``, that run's plan, replay, wall time and held-out losses, so the lineage stays known."""
    if folder is None:
        return None
    out = {"experts": {k: checkpoint_digest(folder / f) for k, f in EXPERT_FILES.items()}}
    try:
        prev = json.loads((folder / "train_log.json").read_text())
        out["log"] = {k: prev.get(k) for k in ("plan", "replay", "wall_s", "environment", "continued_from")}
        out["log"]["heldout_trained"] = {k: v["trained"] for k, v in prev.get("heldout", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("%s: no readable train_log.json (%s); the lineage keeps only the checkpoints' digests",
                       folder, e)
    return out


def join_expert_runs(high_dir: Path, low_dir: Path, out: Path, overwrite: bool = False) -> dict:
    """One model from two one-expert runs (``--expert high`` in ``high_dir``, ``--expert low`` in ``low_dir``,
    both continued from the same experts, e.g. side by side on two GPUs): writes ``out/high_noise.safetensors``
    from the first, ``out/low_noise.safetensors`` from the second and a ``train_log.json`` that holds each
    expert's part of its run's log. Every check runs before anything is written. No decoder is written: train
    one for the joined experts with ``--decoder-only --out OUT``. Returns the joined log."""
    high_dir, low_dir, out = Path(high_dir), Path(low_dir), Path(out)
    logs = {}
    for name, folder in (("high", high_dir), ("low", low_dir)):
        path = folder / "train_log.json"
        try:
            log = json.loads(path.read_text())
            trained = log["config"]["experts"]
            checkpoint = log["checkpoints"][name]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not the log of a mini_train run ({type(e).__name__}: {e})") from None
        if trained != [name]:
            raise ValueError(f"{path}: that run trained the experts {trained}; the {name}-noise expert must come "
                             f"from a run of --expert {name} alone")
        digest = checkpoint_digest(folder / EXPERT_FILES[name])
        if digest["sha256"] != checkpoint["sha256"]:
            raise ValueError(f"{folder / EXPERT_FILES[name]}: not the checkpoint its train_log.json wrote "
                             f"(sha256 {digest['sha256'][:12]}…, logged {checkpoint['sha256'][:12]}…)")
        logs[name] = log
    hi, lo = logs["high"], logs["low"]
    # what the two experts and the joined log's one configuration must agree on
    def shared(log):
        return {"arch": log.get("arch"), "continued_from": (log.get("continued_from") or {}).get("experts"),
                **{k: log["config"].get(k) for k in ("frames", "boundary", "shift", "heldout", "heldout_sigmas",
                                                      "seed")}}
    theirs = shared(lo)
    for key, a in shared(hi).items():
        if a != (b := theirs[key]):
            raise ValueError(f"{high_dir} and {low_dir}: the runs differ in {key!r} ({a} vs {b}); train both from "
                             f"the same experts with the same options to join them")
    # a decoder in --out was trained for other experts: --force replaces the experts beside it, never silently
    targets = [out / EXPERT_FILES["high"], out / EXPERT_FILES["low"], out / "train_log.json",
               out / mini_decoder.DECODER_FILE]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --force to replace it, or choose another --out")

    joined = copy.deepcopy(hi)
    joined["what"] = hi["what"] + "; the two experts trained in two runs and joined (join_expert_runs)"
    joined["config"]["experts"] = ["high", "low"]
    for key in ("plan", "phases", "heldout", "checkpoints"):
        joined[key]["low"] = lo[key]["low"]
    # the low run counted its steps from 1: continue the high run's count, as one run's curve would
    last = max((p["global_step"] for p in hi["curve"] if p["phase"] == "high"), default=0)
    for key in ("curve", "heldout_curve"):
        joined[key] = ([p for p in hi[key] if p["phase"] == "high"]
                       + [{**p, "global_step": p["global_step"] + last} for p in lo[key] if p["phase"] == "low"])
    joined["joined"] = {name: {"dir": str(folder), "replay": logs[name]["replay"], "wall_s": logs[name]["wall_s"],
                               "environment": logs[name]["environment"], "data": logs[name]["data"]}
                        for name, folder in (("high", high_dir), ("low", low_dir))}
    joined["replay"] = (f"(two runs joined: --out DIR_H {hi['replay']}; --out DIR_L {lo['replay']}; "
                        f"--out DIR --join DIR_H DIR_L)")
    joined["wall_s"] = max(hi["wall_s"], lo["wall_s"])
    for key in ("decoder", "generation"):  # belong to other experts: --decoder-only and mini_pictures make them
        joined.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    for name, folder in (("high", high_dir), ("low", low_dir)):
        fmt.write_bytes(out / EXPERT_FILES[name], (folder / EXPERT_FILES[name]).read_bytes(), overwrite=overwrite)
    fmt.write_bytes(out / "train_log.json", json.dumps(joined, indent=1).encode(), overwrite=overwrite)
    logger.info("joined the high-noise expert of %s and the low-noise expert of %s into %s", high_dir, low_dir, out)
    if (out / mini_decoder.DECODER_FILE).exists():
        logger.warning("%s was trained for other experts: train it again with --decoder-only --out %s --force",
                       out / mini_decoder.DECODER_FILE, out)
    else:
        logger.info("next: train their decoder with --decoder-only --out %s", out)
    return joined


def _device_name(device) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or "cpu"


def _comfyui_version() -> str:
    root = runtime.find_comfyui()
    try:
        text_ = (root / "comfyui_version.py").read_text()
        return text_.split('"')[1]
    except (OSError, IndexError, TypeError):
        return "unknown"


# ---- command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--out", required=True, type=Path, help="output folder for the checkpoints and log")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None,
                        help="training time budget (default 7): turned into step counts by a speed probe")
    budget.add_argument("--steps", type=int, help="total optimizer steps, split 30/30/40 warm/high/low")
    budget.add_argument("--phase-steps", help="W,H,L: steps of the warm start and each expert (replays a plan)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=sorted(ARCHS), default="mini")
    p.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 4 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=data.FRAMES, help="pixel frames, 1 + 4k (default 17: 5 latent frames)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 6e-4 on CUDA, 4e-4 on CPU)")
    p.add_argument("--chunk", type=int, default=None, help="videos rendered at once (default 2048 on CUDA)")
    p.add_argument("--reuse", type=int, default=None, help="passes over each rendered chunk (default 8 on CUDA)")
    p.add_argument("--heldout", type=int, default=None, help="held-out videos (default 64 on CUDA, 8 on CPU)")
    p.add_argument("--heldout-sigmas", type=int, default=None,
                   help="held-out timesteps per expert range, stratified in u (default 8 on CUDA, 4 on CPU)")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the weights (0: off); each expert "
                   "keeps the better of raw and EMA weights on the held-out loss")
    dec = p.add_mutually_exclusive_group()
    dec.add_argument("--decoder-seconds", type=float, default=None,
                     help="time budget of the learned video decoder (default 50 s on CUDA, 0 on CPU = none)")
    dec.add_argument("--decoder-steps", type=int, default=None, help="decoder steps (replays a run; 0: none)")
    p.add_argument("--decoder-batch", type=int, default=None, help="decoder videos per step (default 32 on CUDA, 2 on CPU)")
    p.add_argument("--decoder-sampled", type=float, default=0.6,
                   help="fraction of decoder batches whose latents are sampled with both experts (default 0.6)")
    p.add_argument("--decoder-seam", type=float, default=0.3,
                   help="weight of the block-seam penalty in the decoder loss (default 0.3; 0: pixel MSE only)")
    p.add_argument("--decoder-lr", type=float, default=2e-3, help="decoder peak learning rate (default 2e-3)")
    p.add_argument("--decoder-only", action="store_true",
                   help="train only the decoder, from the experts already in --out (e.g. a copy of minimodel/); "
                        "writes --out/decoder.safetensors (--force replaces one) and its entry in train_log.json")
    p.add_argument("--decoder-init", type=Path, default=None,
                   help="start the decoder from this decoder file instead of the linear decoder")
    p.add_argument("--generation", type=int, default=8,
                   help="held-out scenes sampled with both experts for the generation metric and the strips")
    p.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the generation metric and strips")
    p.add_argument("--strips", type=int, default=4, help="held-out scenes in strips.png")
    p.add_argument("--init-experts", type=Path, default=None, metavar="DIR",
                   help="continue both experts from the checkpoints in DIR (e.g. minimodel): no warm start, "
                        "the budget split between the experts 3:4 (default: train from the initialisation)")
    p.add_argument("--expert", choices=("high", "low"), default=None,
                   help="train only this expert, continued from --init-experts, with the whole budget; the other "
                        "is written as it started (default: both). Two such runs, e.g. one per GPU, become one "
                        "model with --join. No decoder and no pictures unless asked for (--decoder-seconds): "
                        "they belong to the joined model")
    p.add_argument("--join", nargs=2, type=Path, metavar=("HIGH_DIR", "LOW_DIR"), default=None,
                   help="write to --out the high-noise expert of HIGH_DIR's --expert high run and the low-noise "
                        "expert of LOW_DIR's --expert low run, with one train_log.json; then train their decoder "
                        "with --decoder-only")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--no-pictures", action="store_true", help="skip strips.png / loss_curve.png")
    p.add_argument("--force", action="store_true", help="replace checkpoints and log already in --out")


def config_from_args(args) -> TrainConfig:
    cuda = str(args.device).startswith("cuda")
    batch = args.batch or (256 if cuda else 4)
    minutes = args.minutes if args.minutes is not None else (None if (args.steps or args.phase_steps) else 7.0)
    phase_steps = tuple(int(s) for s in args.phase_steps.split(",")) if args.phase_steps else None
    return TrainConfig(
        out=args.out, arch=ARCHS[args.arch], device=args.device, seed=args.seed, batch=batch,
        minutes=minutes, steps=args.steps, phase_steps=phase_steps, lr=args.lr or (6e-4 if cuda else 4e-4),
        frames=args.frames, chunk=args.chunk or (2048 if cuda else batch), reuse=args.reuse or (8 if cuda else 1),
        ema=args.ema, decoder_steps=args.decoder_steps,
        decoder_seconds=None if args.decoder_steps is not None else (
            args.decoder_seconds if args.decoder_seconds is not None else (50.0 if cuda and not args.expert else 0.0)),
        decoder_batch=args.decoder_batch or (32 if cuda else 2), decoder_sampled=args.decoder_sampled,
        decoder_seam=args.decoder_seam, decoder_lr=args.decoder_lr,
        decoder_only=args.decoder_only, decoder_init=args.decoder_init, generation=args.generation,
        sample_steps=args.sample_steps, strips=args.strips, init_experts=args.init_experts,
        experts=(args.expert,) if args.expert else ("high", "low"),
        heldout=args.heldout or (64 if cuda else 8),
        heldout_sigmas=args.heldout_sigmas or (8 if cuda else 4), compile=args.compile,
        pictures=not (args.no_pictures or args.expert),
        overwrite=args.force)


def run(args) -> int:
    if args.join is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("expert", "init_experts", "decoder_only", "minutes", "steps",
                                                       "phase_steps", "decoder_seconds", "decoder_steps")
                 if getattr(args, k) not in (None, False)]
        if given:  # they would be ignored: joining trains nothing
            raise ValueError(f"--join only joins two runs (with --out and --force); it takes no {', '.join(given)}")
        join_expert_runs(*args.join, args.out, overwrite=args.force)
        return 0
    cfg = config_from_args(args)
    if cfg.decoder_only:
        train_decoder_only(cfg)
    else:
        train(cfg)
    if cfg.pictures:
        try:
            pictures.make_all(cfg.out, n=cfg.strips, steps=cfg.sample_steps, generation=cfg.generation)
        except Exception as e:  # noqa: BLE001 - the sampler needs ComfyUI's `nodes` (and torchsde); pictures can be made later
            logger.warning("pictures not made (%s: %s); make them with: python -m wan_w4a4.apps.mini_pictures "
                           "--dir %s", type(e).__name__, e, cfg.out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_w4a4.apps.mini_train", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
