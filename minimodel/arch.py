"""Wan2.2 image-to-video transformer shapes, random checkpoints and the quantized layer list.

The key names and shapes are those of ComfyUI's ``comfy/ldm/wan/model.py`` (``WanModel`` with
``model_type='t2v'``, ``qk_norm`` and ``cross_attn_norm`` on), which is how ComfyUI loads
Wan2.2-I2V-A14B: it has no ``img_emb``, so ``comfy/model_detection.py`` detects it as
``WAN21_T2V``; the image enters through the 36 input channels (16 noise + 4 mask + 16 image latent).
Detection reads ``dim`` from ``head.modulation``, ``num_heads = dim // 128``, ``ffn_dim`` from
``blocks.0.ffn.0.weight`` and the layer count from the ``blocks.N.`` keys.

Imports neither ComfyUI nor Triton. A checkpoint is written tensor by tensor, so even the real
14B size (28.6 GB in bf16) needs the memory of one tensor, not of the model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from ..calibration.config import BLOCK_LINEARS  # the ten block Linears (W4A4 replaces them)

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class WanArch:
    """Hyper-parameters of a Wan2.2 I2V transformer, as ComfyUI detects them from a state dict."""

    dim: int
    num_layers: int
    ffn_dim: int
    in_dim: int = 36
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)

    HEAD_DIM: ClassVar[int] = 128  # model_detection.py: num_heads = dim // 128

    def __post_init__(self):
        for name in ("dim", "num_layers", "ffn_dim", "in_dim", "out_dim", "text_dim", "freq_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"WanArch.{name} must be a positive int, got {value!r}")
        if self.dim % self.HEAD_DIM:
            raise ValueError(f"WanArch.dim={self.dim} must be a multiple of {self.HEAD_DIM}: ComfyUI "
                             f"detects num_heads = dim // {self.HEAD_DIM}, so any other dim fails to load")
        if self.freq_dim % 2:
            raise ValueError(f"WanArch.freq_dim={self.freq_dim} must be even (sinusoidal embedding)")
        if len(self.patch_size) != 3 or any(p <= 0 for p in self.patch_size):
            raise ValueError(f"WanArch.patch_size must be three positive ints, got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def num_heads(self) -> int:
        return self.dim // self.HEAD_DIM

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WanArch":
        d = json.loads(text)
        d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)

    @classmethod
    def from_shapes(cls, shapes: dict) -> "WanArch":
        """Reads the architecture off a state dict or a ``{key: shape}`` dict, as ComfyUI does."""
        def shape(key):
            if key not in shapes:
                raise ValueError(f"not a Wan transformer state dict: key {key!r} is missing")
            v = shapes[key]
            return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

        layers = 0
        while f"blocks.{layers}.ffn.0.weight" in shapes:
            layers += 1
        patch = shape("patch_embedding.weight")
        return cls(dim=shape("head.modulation")[-1], num_layers=layers,
                   ffn_dim=shape("blocks.0.ffn.0.weight")[0], in_dim=patch[1],
                   out_dim=shape("head.head.weight")[0] // math.prod(patch[2:]),
                   text_dim=shape("text_embedding.0.weight")[1],
                   freq_dim=shape("time_embedding.0.weight")[1], patch_size=tuple(patch[2:]))


# Wan2.2-I2V-A14B, each of the two experts (high noise, low noise): 14.29 B parameters.
WAN22_I2V_A14B = WanArch(dim=5120, num_layers=40, ffn_dim=13824)
# Smallest shape ComfyUI loads as Wan (2 heads of 128); ~6 MB in bf16, samples on CPU in seconds.
TINY = WanArch(dim=256, num_layers=2, ffn_dim=256)


def wan_state_dict_shapes(arch: WanArch) -> dict[str, tuple[int, ...]]:
    """Every key of a ComfyUI Wan2.2 I2V transformer checkpoint with its shape, in file order."""
    d, f = arch.dim, arch.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, arch.in_dim, *arch.patch_size),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, arch.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, arch.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    linear_shapes = {name: (d, d) for name in BLOCK_LINEARS}
    linear_shapes.update({"ffn.0": (f, d), "ffn.2": (d, f)})
    for i in range(arch.num_layers):
        p = f"blocks.{i}."
        for name in BLOCK_LINEARS:
            shapes[f"{p}{name}.weight"] = linear_shapes[name]
            shapes[f"{p}{name}.bias"] = (linear_shapes[name][0],)
        for attn in ("self_attn", "cross_attn"):  # RMSNorm on q and k (qk_norm=True)
            shapes[f"{p}{attn}.norm_q.weight"] = (d,)
            shapes[f"{p}{attn}.norm_k.weight"] = (d,)
        shapes[f"{p}norm3.weight"] = (d,)  # LayerNorm before cross-attention (cross_attn_norm=True)
        shapes[f"{p}norm3.bias"] = (d,)
        shapes[f"{p}modulation"] = (1, 6, d)
    shapes["head.head.weight"] = (arch.out_dim * math.prod(arch.patch_size), d)
    shapes["head.head.bias"] = (arch.out_dim * math.prod(arch.patch_size),)
    shapes["head.modulation"] = (1, 2, d)
    return shapes


def quantizable_linears(arch: WanArch) -> list[str]:
    """Module names of the block Linears that W4A4 quantizes (10 per block), block by block."""
    return [f"blocks.{i}.{name}" for i in range(arch.num_layers) for name in BLOCK_LINEARS]


def _init_kind(key: str) -> str:
    if ".norm" in key and key.endswith(".weight"):
        return "ones"  # RMSNorm / LayerNorm gains
    if key.endswith(".bias"):
        return "zeros"
    if key.endswith("modulation"):
        return "modulation"
    return "normal"


def _tensor_seed(seed: int, key: str) -> int:
    # One generator per tensor, seeded by (seed, key): the values do not depend on the order or
    # subset of tensors generated, so a streamed file equals the in-memory state dict.
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def random_tensor(arch: WanArch, key: str, shape, seed: int, dtype=torch.bfloat16,
                  scale: float = 0.02) -> torch.Tensor:
    """One tensor of a random Wan checkpoint (see ``random_wan_state_dict``)."""
    kind = _init_kind(key)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(_tensor_seed(seed, key))
    # Wan's own init draws the modulation tables as randn / sqrt(dim).
    std = arch.dim ** -0.5 if kind == "modulation" else scale
    return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)


def iter_random_wan_tensors(arch: WanArch, seed: int = 0, dtype=torch.bfloat16,
                            scale: float = 0.02) -> Iterator[tuple[str, torch.Tensor]]:
    for key, shape in wan_state_dict_shapes(arch).items():
        yield key, random_tensor(arch, key, shape, seed, dtype, scale)


def random_wan_state_dict(arch: WanArch, seed: int = 0, dtype=torch.bfloat16,
                          scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A random Wan2.2 I2V state dict with finite outputs: Linear/Conv weights ~ N(0, scale²),
    biases 0, norm gains 1, modulation ~ N(0, 1/dim). Deterministic in ``seed``."""
    return dict(iter_random_wan_tensors(arch, seed, dtype, scale))


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_wan_checkpoint(path, arch: WanArch, seed: int = 0, dtype=torch.bfloat16,
                         scale: float = 0.02, metadata: dict | None = None) -> Path:
    """Writes ``random_wan_state_dict(arch, seed, dtype, scale)`` as a safetensors file.

    Streams one tensor at a time (peak memory: the largest tensor) and replaces ``path``
    atomically, so a reader never sees a half-written checkpoint. The architecture is recorded in
    the metadata under ``wan_w4a4.arch``.
    """
    if dtype not in _ST_DTYPES:
        raise ValueError(f"write_wan_checkpoint: dtype {dtype} unsupported, use one of {list(_ST_DTYPES)}")
    path = Path(path)
    shapes = wan_state_dict_shapes(arch)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt", "wan_w4a4.arch": arch.to_json(),
                                     **{str(k): str(v) for k, v in (metadata or {}).items()}}}
    offset = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for key, shape in shapes.items():
                t = random_tensor(arch, key, shape, seed, dtype, scale)
                fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.debug("wrote %s (%s, %.1f MB)", path, arch, offset / 1e6)
    return path
