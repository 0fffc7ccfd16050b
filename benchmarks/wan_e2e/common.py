"""What every part of the end-to-end benchmark shares: the configurations, sizes, sampling settings,
file names and small helpers (units, clocks, the child's JSON). Imports neither torch nor ComfyUI at
module level, so argument errors and --help stay fast."""
from __future__ import annotations

import datetime
import json
import os
import resource
from pathlib import Path


class _LazyArch:
    """``wan_w4a4.minimodel.arch``, imported on first use: it imports torch, which argument errors
    and --help do not need."""

    def __getattr__(self, name):
        from wan_w4a4.minimodel import arch
        return getattr(arch, name)


warch = _LazyArch()

REPO = Path(__file__).resolve().parents[2]
BENCH_TAG = "bench_wan_e2e v1"
GIB = 2 ** 30

ARCH_NAMES = ("real", "tiny")  # Wan2.2-I2V-A14B; minimodel.arch.TINY (CPU smoke test)


def arch_of(name: str):
    return {"real": warch.WAN22_I2V_A14B, "tiny": warch.TINY}[name]


# (width, height) in pixels; latent = /8. 480p and 720p are Wan2.2's 832x480 and 1280x720.
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720), "tiny": (64, 64)}
# cond_batch: how a CFG step reaches the model (nodes/chunking.py): "batched" is ComfyUI's default (cond
# and uncond in one call), "auto" runs them one at a time above 32k tokens (the W4A4 loader's default).
CONFIGS = {
    "bf16": {"loader": "UNETLoader", "weight_dtype": "default", "cond_batch": "batched"},
    "fp8": {"loader": "UNETLoader", "weight_dtype": "fp8_e4m3fn", "cond_batch": "batched"},
    "fp8_fast": {"loader": "UNETLoader", "weight_dtype": "fp8_e4m3fn_fast", "cond_batch": "batched"},
    # ComfyUI 0.3.64 leaves Wan's diffusion model in training mode (nn.Module's default; its model_base
    # calls eval() for a few other models only), and its fp8_ops.Linear runs the fp8 matmul only when
    # ``not self.training``: so there fp8_e4m3fn_fast computes in 16 bit for Wan. This reference switches
    # the model to eval mode after loading, to show what the fp8 matmul itself would give. ComfyUI 0.33
    # puts every diffusion model in eval mode and its fp8_ops.Linear no longer looks at the mode, yet on
    # the H200 with dynamic VRAM its fp8_fast profile shows the fp16 cuBLAS kernels of BF16 and BF16's
    # step time (benchmarks/RESULTS.md, 2026-11-29): no fp8 matmul ran there either (cause not traced).
    "fp8_fast_eval": {"loader": "UNETLoader", "weight_dtype": "fp8_e4m3fn_fast", "cond_batch": "batched",
                      "eval": True},
    # What most users run as fp8: ComfyUI's fp8_scaled file (the layout of the official Wan2.2
    # ``*_fp8_scaled`` experts, weights.fp8_scaled_tensors) loaded with weight_dtype "default", as a user
    # loads it. Its marker asks for fp8 matmuls (weights.py), which ComfyUI 0.33 runs through comfy-kitchen's
    # fp8 layout (per-tensor activation scale found per call) and 0.3.64 through its scaled fp8 ops, which
    # (unlike its fp8_e4m3fn_fast) do not look at the training mode. Always read from its file.
    "fp8_scaled": {"loader": "UNETLoader", "weight_dtype": "default", "file": "fp8_scaled", "cond_batch": "batched"},
    "w4a4": {"loader": "WanW4A4LoadModel", "weight_dtype": "w4a4 checkpoint", "cond_batch": "auto"},
    # references: the same cond/uncond split on BF16 (like for like), W4A4 without it
    "bf16_split": {"loader": "UNETLoader", "weight_dtype": "default", "cond_batch": "auto"},
    "w4a4_batched": {"loader": "WanW4A4LoadModel", "weight_dtype": "w4a4 checkpoint", "cond_batch": "batched"},
    # a rank-64 LoRA on every block Linear of both experts, through LoraLoaderModelOnly
    "w4a4_lora": {"loader": "WanW4A4LoadModel", "weight_dtype": "w4a4 checkpoint", "cond_batch": "auto",
                  "lora_rank": 64},
}
# --all: BF16, W4A4 and ComfyUI's fp8 weights with its fast fp8 matmul; plain "fp8" (same bytes,
# bf16 compute) and the references only on request. Most important first: a budget cut drops the last.
ALL_ORDER = ("bf16", "w4a4", "fp8_fast")
LORA_RANK = 64
MODES = ("default", "one-expert")
BOUNDARY_SIGMA = 0.9  # Wan2.2 I2V: the high-noise expert while t = 1000 sigma >= 900
SHIFT, CFG, SAMPLER, SCHEDULER = 8.0, 3.5, "euler", "simple"
W4A4_RANK, W4A4_BINS = 32, 4
TIMING_KEY = "wan_w4a4.bench_timing"


def gib(x) -> float | None:
    return None if x is None else round(x / GIB, 3)


def device_used_bytes() -> int:
    """Device memory in use as the driver sees it (total - free, what nvidia-smi shows): the CUDA context,
    PyTorch's cache, and what lives outside PyTorch's allocator (dynamic VRAM's streamed weights)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def host_peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)  # Linux: KiB


def host_rss_gib() -> float | None:
    try:
        import psutil
        return round(psutil.Process().memory_info().rss / GIB, 3)
    except ImportError:
        return None


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def latent_shape(args) -> tuple[int, ...]:
    w, h = RESOLUTIONS[args.res]
    return (1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8)


def file_names(args) -> dict:
    tag = f"wan_bench_{args.arch}_s{args.seed}"
    return {"bf16": f"{tag}_bf16.safetensors", "fp8_scaled": f"{tag}_fp8_scaled.safetensors",
            "w4a4": f"{tag}_w4a4.safetensors",
            "lora": f"{tag}_r{LORA_RANK}_lora.safetensors"}


def is_w4a4(config: str) -> bool:
    return CONFIGS[config]["loader"] == "WanW4A4LoadModel"


def base_dir(args) -> Path:
    return Path(args.workdir) / "comfy_base"


def device_of(args):
    import torch
    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def write_json(path: Path, data: dict) -> None:
    """Atomic (temp + rename): the parent may read a child's file at any time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)

