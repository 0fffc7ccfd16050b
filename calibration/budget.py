"""A GPU memory budget for calibration (``CalibrationConfig.gpu_budget_gib``).

Where calibration's GPU memory goes at real size (``calibration/README.md``, H100): the BF16 expert
ComfyUI loads for sampling (26.6 GiB), the statistics of the blocks captured in one pass (one fp32
Hessian per layer input: 1.30 GiB per Wan2.2 A14B block) and the activations of sampling. Under a
budget of B GiB:

- **statistics** get at most ``STATS_SHARE`` of B (40 %): the number of blocks per pass is the largest
  that fits (:func:`blocks_per_pass`), and an explicit ``blocks_per_pass`` over it is refused before
  any work (:func:`check`);
- **the expert's weights** are what ComfyUI may load next to them: :func:`comfy_budget` makes ComfyUI's
  loader see a device of B − ``HOOK_RESERVE_GIB`` GiB (its ``EXTRA_RESERVED_VRAM``), so it loads the expert partially and
  streams the rest per call (its lowvram path), as it does for any model larger than the GPU;
- **quantization** of a pass's layers runs after ComfyUI has unloaded the expert (``pipeline``), so the
  per-layer work (GPTQ on the Hessian, the layer's weight) needs only the pass's statistics beside it;
- **under dynamic VRAM** (ComfyUI 0.33's default on NVIDIA) the streamed weights live in comfy-aimdo's
  own device buffers, outside PyTorch's allocator and outside ``EXTRA_RESERVED_VRAM``. comfy-aimdo keeps
  a headroom free on the whole device (its ``init_devices``, ComfyUI's ``--vram-headroom``), counting
  every allocation on it, so a headroom of the device's size minus B bounds the process at B
  (:func:`dynamic_vram_headroom`). It is fixed when ComfyUI starts: the CLI sets it from the budget;
  inside a running ComfyUI, :func:`comfy_budget` warns when the server's headroom is smaller.

The sizes are exact sums of the tensors ``hessian.InputStats`` allocates, so the plan is a
function of the layer shapes alone and is known before the model is sampled.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence

import torch

from .capture import CalibrationError, LayerSpec
from .config import CalibrationConfig

log = logging.getLogger(__name__)

GiB = 2**30
# The statistics' part of the budget; the rest holds the expert's loaded weights and sampling's
# activations (at 480p x 33 one step's activations of a 14B block are a few GiB).
STATS_SHARE = 0.4
# Kept free for what ComfyUI's own estimate of a sampling step does not count: the capture hooks'
# transients (a token subset and a chunk of rows in fp32 per observed input) and the statistics'
# per-pass temporaries.
HOOK_RESERVE_GIB = 2.0


def input_stats_bytes(k: int, hessian: bool = True) -> int:
    """Bytes of one ``hessian.InputStats`` of ``k`` features: the fp32 Hessian, the float64 sum and
    the float32 min and max."""
    return (k * k * 4 if hessian else 0) + k * 8 + 2 * k * 4


def group_bytes(k: int, config: CalibrationConfig) -> int:
    """Device bytes of one ``capture.GroupStats`` (its reservoirs live on the host)."""
    return input_stats_bytes(k) + (input_stats_bytes(k, hessian=False) if config.token_fraction < 1.0 else 0)


def block_bytes(specs: Sequence[LayerSpec], config: CalibrationConfig) -> dict[int, int]:
    """Statistics bytes per block: one GroupStats per layer input (layers sharing an input share it)."""
    groups: dict[str, tuple[int, int]] = {}
    for s in specs:
        groups.setdefault(s.group, (s.block, s.in_features))
    out: dict[int, int] = {}
    for block, k in groups.values():
        out[block] = out.get(block, 0) + group_bytes(k, config)
    return out


def _largest_run(sizes: Sequence[int], n: int) -> int:
    """The largest sum of ``n`` consecutive entries (a pass takes consecutive blocks)."""
    return max(sum(sizes[i:i + n]) for i in range(max(1, len(sizes) - n + 1)))


def _plan_inputs(specs: Sequence[LayerSpec], config: CalibrationConfig) -> tuple[list[int], float]:
    """(statistics bytes of each block in block order, the bytes the budget gives them)."""
    return [b for _, b in sorted(block_bytes(specs, config).items())], STATS_SHARE * config.gpu_budget_gib * GiB


def blocks_per_pass(specs: Sequence[LayerSpec], config: CalibrationConfig) -> int | None:
    """``config.blocks_per_pass`` when set, else, under a budget, the most blocks whose statistics fit
    its ``STATS_SHARE``; None (every block in one pass) without a budget."""
    if config.blocks_per_pass is not None or config.gpu_budget_gib is None:
        return config.blocks_per_pass
    per_block, limit = _plan_inputs(specs, config)
    if not per_block:
        return None
    n = 0
    while n < len(per_block) and _largest_run(per_block, n + 1) <= limit:
        n += 1
    return max(n, 1)


def check(specs: Sequence[LayerSpec], config: CalibrationConfig, what: str) -> None:
    """Refuses, before any work, a budget that cannot hold one block's statistics or an explicit
    ``blocks_per_pass`` whose statistics exceed the budget's share."""
    if config.gpu_budget_gib is None:
        return
    per_block, limit = _plan_inputs(specs, config)
    if not per_block:
        return
    n = config.blocks_per_pass or 1
    need = _largest_run(per_block, min(n, len(per_block)))
    if need > limit:
        fix = (("lower blocks_per_pass" if n > 1 else "raise the budget")
               + f" (statistics take at most {STATS_SHARE:.0%} of the budget; the rest holds the model's weights "
               "and activations)")
        raise CalibrationError(f"{what}: the statistics of {min(n, len(per_block))} block(s) per pass need "
                               f"{need / GiB:.2f} GiB, over {STATS_SHARE:.0%} of the {config.gpu_budget_gib:g} GiB "
                               f"GPU budget ({limit / GiB:.2f} GiB); {fix}")


def dynamic_vram_headroom(total_bytes: int, budget_gib: float) -> int:
    """The comfy-aimdo headroom (bytes kept free on a device of ``total_bytes``) that leaves
    ``budget_gib`` GiB for the whole process: its PyTorch allocations and aimdo's streamed weights."""
    return max(0, int(total_bytes - budget_gib * GiB))


def _warn_unbounded_dynamic_vram(config: CalibrationConfig, total: int) -> None:
    """Under dynamic VRAM the budget binds aimdo's weights only through the headroom ComfyUI started
    with (``args.vram_headroom``, GiB); say so when it is smaller than the budget needs."""
    memory = sys.modules.get("comfy.memory_management")
    if not getattr(memory, "aimdo_enabled", False):
        return
    from comfy.cli_args import args
    need = dynamic_vram_headroom(total, config.gpu_budget_gib)
    if getattr(args, "vram_headroom", 0) * GiB < need:
        log.warning("GPU budget %.1f GiB: ComfyUI's dynamic VRAM streams weights outside it (its headroom is "
                    "%.1f GiB); start ComfyUI with --vram-headroom %.1f to keep the whole process within the budget",
                    config.gpu_budget_gib, getattr(args, "vram_headroom", 0), need / GiB)


@contextlib.contextmanager
def comfy_budget(config: CalibrationConfig, device):
    """While calibration runs, ComfyUI's loader sees a device of ``config.gpu_budget_gib`` minus
    ``HOOK_RESERVE_GIB``: its reserved memory (``comfy.model_management.EXTRA_RESERVED_VRAM``) is raised to
    the rest of the device, and restored afterwards. Without a budget, or off CUDA, nothing changes."""
    device = torch.device(device)
    if config.gpu_budget_gib is None or device.type != "cuda":
        yield
        return
    import comfy.model_management as mm

    total = torch.cuda.get_device_properties(device).total_memory
    _warn_unbounded_dynamic_vram(config, total)
    before = mm.EXTRA_RESERVED_VRAM
    reserve = max(before, total - int((config.gpu_budget_gib - HOOK_RESERVE_GIB) * GiB))
    mm.EXTRA_RESERVED_VRAM = reserve
    log.info("GPU budget %.1f GiB: ComfyUI reserves %.1f of the device's %.1f GiB while calibrating",
             config.gpu_budget_gib, reserve / GiB, total / GiB)
    try:
        yield
    finally:
        mm.EXTRA_RESERVED_VRAM = before
