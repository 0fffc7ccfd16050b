"""The command line of benchmarks/bench_wan_e2e.py: options, their defaults by arch, and the checks
done before any work starts (frames 1 + 4k, known configurations and memory modes)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from wan_w4a4.apps import runtime

from .common import ALL_ORDER, ARCH_NAMES, CONFIGS, MODES, REPO, RESOLUTIONS

DESCRIPTION = "Real-size Wan2.2-I2V-A14B end to end through ComfyUI: peak memory, step time, calibration cost."


def parse_args(argv=None, description: str = DESCRIPTION):
    """The parsed options (``description`` heads --help: the entry point passes its usage lines)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"comma-separated from {list(CONFIGS)}, or 'none'")
    p.add_argument("--all", action="store_true", help=f"{', '.join(ALL_ORDER)}, in that order (plain fp8 only with --config)")
    p.add_argument("--memory", default="default,one-expert",
                   help="memory modes, comma-separated: default, one-expert (default: both, in that order)")
    p.add_argument("--arch", choices=ARCH_NAMES, default="real", help="real: Wan2.2-I2V-A14B; tiny: CPU smoke test")
    p.add_argument("--res", choices=list(RESOLUTIONS), default=None, help="480p (default), 720p; tiny: 64x64")
    p.add_argument("--frames", type=int, default=None, help="video frames, 1 + 4k (default 81; tiny arch: 5)")
    p.add_argument("--steps", type=int, default=4, help="total steps, split at t=900 (default 4: 2 high + 2 low)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=("auto", "file", "memory"), default="auto")
    p.add_argument("--workdir", type=Path, default=None,
                   help="generated models and scratch (default $WAN_BENCH_DIR or <repo>/build/bench_e2e)")
    runtime.add_arguments(p)  # --comfyui, --cpu, --dynamic-vram (with it, compare the device-level 'used' column)
    p.add_argument("--attention", choices=("auto", "comfy", "cudnn first"), default="comfy",
                   help="SDPA order for every configuration (nodes/attention.py): comfy (default) keeps ComfyUI's, "
                        "as a BF16 graph runs; auto is what the W4A4 nodes do by default (cuDNN first on Hopper); "
                        "the same order for all configurations keeps them comparable")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--results-md", default=None,
                   help="markdown file to append to (default benchmarks/RESULTS.md for --arch real, none for tiny); 'none'")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total wall-clock budget; children that would start with less than --min-child-s left are "
                        "skipped and a running child is stopped at the budget")
    p.add_argument("--min-child-s", type=float, default=45.0)
    p.add_argument("--profile", action="store_true",
                   help="profile one model call per configuration (torch.profiler, CUDA kernels): GPU time per "
                        "kernel family and the top kernels; that call is left out of the step times")
    p.add_argument("--profile-call", type=int, default=1, metavar="N",
                   help="with --profile: profile the N-th model call of the low stage (default 1, the stage's first, "
                        "which also moves the expert's weights in; a later one shows a warm step's kernels)")
    c = p.add_argument_group("calibration timing")
    c.add_argument("--calibrate", action="store_true", help="also time calibration of both experts")
    c.add_argument("--calib-items", type=int, default=2)
    c.add_argument("--calib-frames", type=int, default=None, help="default 33 (tiny arch: 5)")
    c.add_argument("--calib-res", choices=list(RESOLUTIONS), default=None, help="default 480p (tiny arch: tiny)")
    c.add_argument("--calib-steps", type=int, default=4)
    c.add_argument("--calib-blocks", type=int, default=2, help="blocks calibrated (the rest kept BF16), default 2")
    c.add_argument("--calib-blocks-per-pass", type=int, default=None, help="CalibrationConfig.blocks_per_pass")
    c.add_argument("--calib-token-fraction", type=float, default=0.25)
    c.add_argument("--calib-gpu-budget", type=float, default=None, metavar="GIB", help="CalibrationConfig.gpu_budget_gib")
    c.add_argument("--calib-source", choices=("bf16", "fp8_scaled"), default="bf16",
                   help="the experts calibration reads: the BF16 file, or its fp8_scaled version in ComfyUI's layout "
                        "(the official Wan2.2 template's *_fp8_scaled experts), written next to the BF16 file; not "
                        "with --source memory")
    c.add_argument("--calib-gpu-cap", type=float, default=None, metavar="GIB",
                   help="cap the calibration process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    c.add_argument("--calib-full-blocks-per-pass", type=int, default=10,
                   help="blocks_per_pass assumed when extrapolating to all blocks (default 10)")
    p.add_argument("--report-from", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only re-render the report of earlier --json files (e.g. copied back from the GPU "
                        "machine) and append it to --results-md")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--_child", choices=("gen", "run", "calibrate"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_need-bf16", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_need-w4a4", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_need-lora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_need-fp8", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    tiny = args.arch == "tiny"
    args.res = args.res or ("tiny" if tiny else "480p")
    args.frames = args.frames or (5 if tiny else 81)
    args.calib_res = args.calib_res or ("tiny" if tiny else "480p")
    args.calib_frames = args.calib_frames or (5 if tiny else 33)
    for what, f in (("--frames", args.frames), ("--calib-frames", args.calib_frames)):
        if f < 1 or (f - 1) % 4:
            p.error(f"{what} must be 1 + 4k (Wan's temporal compression), got {f}")
    if args.profile_call < 1:
        p.error(f"--profile-call counts from 1, got {args.profile_call}")
    if args.steps < 2:
        p.error(f"--steps must be >= 2 so that each expert gets a step (split at t=900), got {args.steps}")
    args.memory = [m.strip() for m in args.memory.split(",") if m.strip()]
    bad = [m for m in args.memory if m not in MODES]
    if bad or not args.memory:
        p.error(f"--memory: unknown mode(s) {bad}; use {', '.join(MODES)}")
    if args.workdir is None:
        args.workdir = Path(os.environ.get("WAN_BENCH_DIR") or REPO / "build" / "bench_e2e")
    args.workdir = args.workdir.resolve()
    if args._child is None and args.report_from is None:
        if args.all:
            configs = list(ALL_ORDER)
        elif args.config:
            configs = [] if args.config == "none" else [c.strip() for c in args.config.split(",") if c.strip()]
        else:
            p.error("give --all, --config NAME[,NAME...] or --config none --calibrate")
        bad = [c for c in configs if c not in CONFIGS]
        if bad:
            p.error(f"unknown configuration(s) {bad}; choose from {list(CONFIGS)}")
        if not configs and not args.calibrate:
            p.error("nothing to do: no configuration and no --calibrate")
        if args.calib_source == "fp8_scaled" and args.source == "memory":
            p.error("--calib-source fp8_scaled reads an fp8_scaled file: not with --source memory")
        args.configs = configs
        if args.results_md is None:
            args.results_md = "none" if tiny else str(REPO / "benchmarks" / "RESULTS.md")
    return args
