"""The calibration-timing child: ``wan_w4a4.calibration.calibrate`` on both experts with a short
random calibration set on the first blocks, and an extrapolation to all blocks (labelled as one)."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path

from .child import env_info
from .common import (
    RESOLUTIONS,
    arch_of,
    base_dir,
    device_used_bytes,
    file_names,
    gib,
    host_peak_rss_gib,
    warch,
)
from .weights import random_state_dict


class DeviceUsedPeak:
    """The most device memory in use (total - free, what nvidia-smi shows) while the block runs, polled
    every 50 ms from a thread: under dynamic VRAM the streamed weights are not in PyTorch's counters."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda, 0, None

    def _poll(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, device_used_bytes())

    def __enter__(self):
        import threading
        if self.cuda:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._stop.set()
            self._thread.join()
        return False


def full_run_blocks_per_pass(arch, config, args) -> int:
    """Blocks per pass of a run over all of ``arch``'s blocks: what the GPU budget plans for them
    (``calibration/budget.py``), else ``--calib-full-blocks-per-pass``."""
    from wan_w4a4.calibration import budget
    from wan_w4a4.calibration.capture import BLOCK_LINEARS, layer_spec
    from wan_w4a4.minimodel.arch import wan_state_dict_shapes

    if config.gpu_budget_gib is None:
        return args.calib_full_blocks_per_pass
    shapes = wan_state_dict_shapes(arch)
    specs = [layer_spec(i, n, shapes[f"blocks.{i}.{n}.weight"][1], shapes[f"blocks.{i}.{n}.weight"][0], config)
             for i in range(arch.num_layers) for n in BLOCK_LINEARS]
    return budget.blocks_per_pass(specs, dataclasses.replace(config, keep=()))


def blocks_run(passes: list, num_layers: int) -> list[int]:
    """Blocks each capture pass runs per model call: the first pass records the outputs the later ones
    replay, so it runs them all; a later pass stops after its last block (``capture.ExpertCapture``)."""
    return [num_layers if i == 0 else max(p) + 1 for i, p in enumerate(passes)]


def capture_model(blocks: list[int], seconds: list[float]) -> tuple[float, float, str]:
    """(seconds per call-set, seconds per block run, how) fitted to measured passes: the least-squares line
    through (blocks run, capture seconds) when the passes ran different numbers of blocks, else a line
    through zero (no fixed part: a lower bound for shorter passes)."""
    pts = [(b, t) for b, t in zip(blocks, seconds, strict=True) if t is not None]
    if len({b for b, _ in pts}) >= 2:
        mb, mt = statistics.mean(b for b, _ in pts), statistics.mean(t for _, t in pts)
        slope = sum((b - mb) * (t - mt) for b, t in pts) / sum((b - mb) ** 2 for b, _ in pts)
        return mt - slope * mb, slope, "least-squares line through the measured passes"
    if not pts:
        return 0.0, 0.0, "no pass measured"
    return 0.0, statistics.mean(t / b for b, t in pts), "proportional to blocks run (lower bound)"


def run_calibration(args) -> dict:
    import torch
    from wan_w4a4.apps import runtime
    try:
        from wan_w4a4.calibration import CalibrationConfig, calibrate, synthetic_items
        from wan_w4a4.calibration.capture import block_passes
    except ImportError as e:
        return {"skipped": f"the calibration API is not available ({e})"}

    t_start = time.perf_counter()
    arch = arch_of(args.arch)
    cuda = torch.cuda.is_available() and not args.cpu
    runtime.init_comfyui(args.comfyui, cpu=not cuda, base_directory=base_dir(args), dynamic_vram=args.dynamic_vram,
                         gpu_budget_gib=args.calib_gpu_budget)
    import comfy.sd

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if args.calib_gpu_cap:  # the GPU a user has, on a larger one: allocations past the cap fail
            torch.cuda.set_per_process_memory_fraction(
                args.calib_gpu_cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    names = file_names(args)
    path = base_dir(args) / "models" / "diffusion_models" / names[args.calib_source]
    load_times = []

    def loader(i: int):
        """The expert, loaded when calibration gets to it and dropped after it, as the CLI does
        (``apps/calibrate.py``): one BF16 expert in host memory at a time."""
        def load():
            t = time.perf_counter()
            with torch.inference_mode():
                if args.source == "file" or args.calib_source == "fp8_scaled":  # fp8_scaled: always its file
                    m = comfy.sd.load_diffusion_model(str(path))
                else:
                    sd = random_state_dict(arch, args.seed + 1 + i, torch.device("cuda" if cuda else "cpu"))
                    m = comfy.sd.load_diffusion_model_state_dict(sd)
                    del sd
            load_times.append(time.perf_counter() - t)
            return m
        return load

    models = {e: loader(i) for i, e in enumerate(("high", "low"))}
    w, h = RESOLUTIONS[args.calib_res]
    items = synthetic_items(args.calib_items, frames=args.calib_frames, height=h, width=w,
                            text_tokens=args.text_tokens, text_dim=arch.text_dim, seed=args.seed)
    nblocks = min(args.calib_blocks, arch.num_layers)
    bpp = args.calib_blocks_per_pass
    config = CalibrationConfig(steps=args.calib_steps, keep=tuple(range(nblocks, arch.num_layers)),
                               blocks_per_pass=bpp, token_fraction=args.calib_token_fraction,
                               gpu_budget_gib=args.calib_gpu_budget,
                               out_dir=str(Path(args.workdir) / "calibration"), name="bench", overwrite=True,
                               seed=args.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with DeviceUsedPeak(cuda) as used:  # dynamic VRAM's weights live outside PyTorch's allocator
        res = calibrate(models["high"], models["low"], items, config)
    cal_s = time.perf_counter() - t0
    load_s = sum(load_times)  # inside cal_s: the experts load when their turn comes
    out = {"items": args.calib_items, "frames": args.calib_frames, "res": args.calib_res, "steps": args.calib_steps,
           "blocks_calibrated": nblocks, "blocks_total": arch.num_layers, "blocks_per_pass": bpp,
           "gpu_budget_gib": args.calib_gpu_budget, "gpu_cap_gib": args.calib_gpu_cap, "source": args.calib_source,
           "dynamic_vram": runtime.dynamic_vram_enabled(),
           "token_fraction": args.calib_token_fraction, "load_s": round(load_s, 2), "calibrate_s": round(cal_s, 2),
           "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
           "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
           "device_used_max_gib": gib(used.peak) if cuda else None,
           "host_peak_rss_gib": host_peak_rss_gib(), "env": env_info(cuda), "experts": {}}
    data = res.data
    est_total = 0.0
    # A full run cannot hold the Hessians of all 40 blocks next to the model (~1.4 GB per block at
    # real size): it samples once per group of blocks_per_pass blocks.
    full_bpp = min(bpp or full_run_blocks_per_pass(arch, config, args), arch.num_layers)
    out["full_run_blocks_per_pass"] = full_bpp
    for e in ("high", "low"):
        d = data["experts"][e]
        cap, qua = d.get("capture_s", []), d.get("quantize_s", [])
        nl = len(d.get("layers", []))
        # Each layer's own time (report.LayerRecord.seconds), kept with the layer in the work folder: a
        # resumed pass's quantize_s counts only the layers it did, the records count every layer once.
        secs = [r.get("seconds") for r in d.get("layers", [])]
        per_layer = statistics.mean(secs) if secs and None not in secs else (sum(qua) / nl if nl else None)
        fixed, per_block, how = capture_model(blocks_run(d.get("passes", []), arch.num_layers), cap)
        full_plan = block_passes(list(range(arch.num_layers)), full_bpp)
        full_capture = sum(fixed + per_block * b for b in blocks_run(full_plan, arch.num_layers))
        full_layers = arch.num_layers * len(warch.BLOCK_LINEARS)
        est = full_capture + (per_layer or 0.0) * full_layers
        est_total += est
        out["experts"][e] = {"layers": nl, "passes": d.get("passes"), "capture_s": cap, "quantize_s": qua,
                             "capture_fixed_s": round(fixed, 2), "capture_s_per_block": round(per_block, 3),
                             "capture_fit": how, "extrapolated_capture_s": round(full_capture, 1),
                             "quantize_s_per_layer": None if per_layer is None else round(per_layer, 3),
                             "extrapolated_40_blocks_s": round(est, 1)}
    out["extrapolated_total_s"] = round(est_total + load_s, 1)
    out["loading"] = "lazy, one expert at a time (as apps/calibrate.py); load_s is part of calibrate_s"
    out["extrapolation"] = (f"capture: {math.ceil(arch.num_layers / full_bpp)} passes of {full_bpp} blocks, the "
                            f"last blocks' first (it runs all {arch.num_layers} blocks a call and records), each other "
                            f"stopping after its last block, at the fitted seconds per pass (fixed + per block run); "
                            f"+ measured quantize time per layer x {arch.num_layers * len(warch.BLOCK_LINEARS)} layers, "
                            f"per expert, + loading; hook work grows with blocks per pass, so the capture part is a "
                            f"lower bound when fewer blocks per pass were measured")
    out["resources"] = data.get("resources")
    out["wall_s"] = round(time.perf_counter() - t_start, 2)
    return out
