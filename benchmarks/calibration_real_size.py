"""Time and memory of ``calibrate`` at Wan2.2-A14B layer shapes (dim 5120, ffn 13824), random weights.

Writes a random Wan2.2-I2V checkpoint with ``--layers`` blocks (default 4: 2.9 GB; 40 is the real
14B expert, 28.6 GB), uses it for both experts, calibrates through the real ComfyUI sampling, and
prints wall time per phase, seconds per layer by kind, peak GPU memory and peak host RSS, plus an
extrapolation to 40 blocks. Example (one H100, the issue's measurement set)::

    python benchmarks/calibration_real_size.py --workdir /tmp/cal --layers 4 --items 2 --steps 20 \\
        --frames 33 --height 480 --width 832 --blocks-per-pass 2

Random weights time the work faithfully but have no real outliers: the SQNRs it prints say nothing
about quality.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=5120)
    p.add_argument("--ffn", type=int, default=13824)
    p.add_argument("--items", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--blocks-per-pass", type=int, default=None)
    p.add_argument("--token-fraction", type=float, default=1.0)
    p.add_argument("--rows-per-bin", type=int, default=1024)
    p.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from wan_w4a4.apps import runtime
    runtime.init_comfyui(cpu=True if args.cpu else None)
    import comfy.sd
    import torch

    from wan_w4a4.calibration import CalibrationConfig, calibrate, synthetic_items
    from wan_w4a4.minimodel.arch import WanArch, write_wan_checkpoint

    args.workdir.mkdir(parents=True, exist_ok=True)
    arch = WanArch(dim=args.dim, num_layers=args.layers, ffn_dim=args.ffn)
    ckpt = args.workdir / f"wan_{args.dim}_{args.layers}x{args.ffn}.safetensors"
    t0 = time.perf_counter()
    if not ckpt.exists():
        write_wan_checkpoint(ckpt, arch, seed=0)
    t_write = time.perf_counter() - t0

    load_s = []

    def load():  # same file for both experts: the work does not depend on the weights
        t = time.perf_counter()
        m = comfy.sd.load_diffusion_model(str(ckpt))
        load_s.append(round(time.perf_counter() - t, 1))
        return m
    items = synthetic_items(args.items, frames=args.frames, height=args.height, width=args.width,
                            text_tokens=args.text_tokens, text_dim=arch.text_dim)
    cfg = CalibrationConfig(steps=args.steps, blocks_per_pass=args.blocks_per_pass, out_dir=str(args.workdir / "out"),
                            overwrite=True, token_fraction=args.token_fraction, rows_per_bin=args.rows_per_bin,
                            alphas=tuple(float(a) for a in args.alphas.split(",")))
    if torch.cuda.is_available() and not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = calibrate(load, load, items, cfg)  # loaders: one BF16 expert in host memory at a time
    t_cal = time.perf_counter() - t0
    rep = json.loads(Path(result.report).read_text())

    res = rep["resources"]
    print(f"\n== calibrate at dim {args.dim}, ffn {args.ffn}, {args.layers} blocks; {args.items} items x "
          f"{args.steps} steps at {args.width}x{args.height}x{args.frames} ==")
    print(f"checkpoint write {t_write:.1f} s, expert loads {load_s} s, calibrate {t_cal:.1f} s (loads included)")
    print(f"peak GPU allocated {res.get('peak_gpu_allocated_gib', 'n/a')} GiB, peak host RSS "
          f"{res.get('peak_host_rss_gib', 'n/a')} GiB")
    quant_total = 0.0
    for expert in ("high", "low"):
        e = rep["experts"][expert]
        quant_total += sum(e["quantize_s"])
        print(f"{expert}: {e['steps']} steps, passes {e['passes']}, capture s {e['capture_s']}, "
              f"quantize s {e['quantize_s']}, bin rows {e['bin_rows']}")
        kinds: dict[str, list[float]] = {}
        for r in e["layers"]:
            kinds.setdefault(r["name"].split(".", 2)[2], []).append(r["seconds"])
        print("  seconds per layer: " + ", ".join(f"{k} {statistics.mean(v):.2f}" for k, v in kinds.items()))
    per_block = quant_total / (2 * args.layers)
    print(f"extrapolated quantize time for 2 experts x 40 blocks: {per_block * 80 / 60:.1f} min "
          f"(+ capture: passes x items x steps x (forward + hooks); see the report's capture_s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
