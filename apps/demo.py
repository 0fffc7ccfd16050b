"""``python -m wan_w4a4 demo``: calibrate -> quantize -> sample the embedded mini model, BF16 vs W4A4, on CPU.

1. finds ComfyUI (``COMFYUI_PATH``, the pack's parent folders, ``~/ComfyUI``; ``--comfyui``) and starts
   it in this process on the CPU;
2. loads the two trained experts shipped in ``minimodel/`` with ComfyUI's ``UNETLoader``;
3. calibrates both (``calibration.calibrate``: timestep-aware SVDQuant + GPTQ with per-expert,
   per-bin clip ratios) on procedural scenes of the *training* seed range, never the held-out ones;
4. applies the two states (``nodes.apply.apply_w4a4_state``: patched clones + the timestep hook);
5. samples held-out (start frame, caption) pairs with fixed seeds through the standard two-expert
   graph in BF16 and in W4A4 and prints one table row: PSNR / SSIM of the W4A4 video against the BF16
   video, latent relative error, mean velocity SQNR (``minimodel/fidelity.py``), and the memory of the
   quantized Linears against BF16; then one line per pair: PSNR / SSIM of BF16 and W4A4 against the
   reference (the held-out video through the encoder and the decoder) and of W4A4 against BF16. Pictures
   and PSNR / SSIM are in pixel space, decoded by the learned decoder shipped in ``minimodel/``
   (``decoder.embedded_vae``; the linear VAE if it is missing), named in ``demo.json``'s ``pixel_space``;
6. writes ``demo.png`` (per pair: labelled reference / BF16 / W4A4 frame rows with those per-pair
   numbers, ``mini_pictures.draw_comparison``), ``demo.json`` (the numbers) and the two states with their
   calibration report into ``--out`` (default ``./wan_w4a4_demo``), refusing to replace existing files
   unless ``--overwrite``.

On CPU the model runs in fp32 with the checkpoints' BF16 weights ("BF16" below means these weights
unquantized); W4A4 layers run the eager reference numerics (``kernels/numerics.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

from . import runtime  # imports neither comfy nor torch: --help stays fast
from .calibrate import torch_threads  # as light

# The modules that import torch (calibration, kernels, minimodel, nodes, mini_sample, mini_pictures) are
# imported inside the functions that use them: `python -m wan_w4a4 --help` imports this module.

log = logging.getLogger(__name__)

DEFAULT_OUT = "wan_w4a4_demo"
STATE_NAME = "mini_w4a4"
FILES = ("demo.png", "demo.json", f"{STATE_NAME}_high.safetensors", f"{STATE_NAME}_low.safetensors",
         f"{STATE_NAME}_report.json")
ROW_LABELS = {"reference": "reference", "bf16": "BF16", "w4a4": "W4A4"}  # video key -> figure row label
# --quick: the smallest run that still exercises every stage (the test uses it).
QUICK = {"items": 1, "calib_steps": 4, "steps": 4, "pairs": 1, "bins": 2, "rows_per_bin": 128,
         "alphas": (0.25, 0.5, 0.75), "clip_grid": (1.0, 0.9, 0.8, 0.7)}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    runtime.add_arguments(p, device=False)  # --comfyui; the demo always runs on the CPU
    p.add_argument("--quick", action="store_true", help="tiny budget (1 item, 2+2 steps, 1 pair; for tests)")
    p.add_argument("--items", type=int, default=2, help="calibration items (training-range scenes)")
    p.add_argument("--item-seed", type=int, default=0, help="first scene seed of the calibration items")
    p.add_argument("--calib-steps", type=int, default=8, help="sampling steps during calibration")
    p.add_argument("--steps", type=int, default=12, help="sampling steps of the compared videos")
    p.add_argument("--pairs", type=int, default=2, help="held-out (start frame, caption) pairs")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first pair (pair i: seed + i)")
    p.add_argument("--bins", type=int, default=4, help="timestep bins per expert")
    p.add_argument("--rank", type=int, default=32, help="low-rank branch rank")
    p.add_argument("--rows-per-bin", type=int, default=1024, help="calibration rows kept per bin")
    p.add_argument("--alphas", type=_floats, default=None, help="smoothing grid (default: the pack's)")
    p.add_argument("--clip-grid", type=_floats, default=None, help="clip ratio grid (default: the pack's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 by default: these layers "
                   "are small, and on a busy 2-core machine 2 threads measured 5x slower than 1)")


def _settings(args) -> dict:
    s = {k: getattr(args, k) for k in ("items", "calib_steps", "steps", "pairs", "bins", "rows_per_bin",
                                        "alphas", "clip_grid")}
    if args.quick:
        s.update(QUICK)
    return s


def _fail(msg: str, code: int = 2) -> int:
    print(f"demo: {msg}", file=sys.stderr)
    return code


class DemoError(Exception):
    """A problem with the demo's input or environment; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Comparison:
    """What ``compare`` measured: ``rows`` (one dict per pair, as saved in ``demo.json``), ``videos`` (per
    pair: "reference", "bf16", "w4a4" -> ``[F, H, W, 3]`` in [0, 1]), ``summary``, the states' paths and
    the seconds spent starting and calibrating."""
    rows: list
    videos: list
    summary: dict
    states: dict
    t_cal: float


def run(args) -> int:
    with torch_threads(args.threads):  # restored after: in-process callers keep their own setting
        return _run(args)


def _run(args) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    existing = [str(out / f) for f in FILES if (out / f).exists()]
    if existing and not args.overwrite:
        return _fail(f"refusing to overwrite {', '.join(existing)} (pass --overwrite or choose another --out)", 1)
    try:
        c = compare(args)
    except DemoError as e:
        return _fail(str(e), e.code)
    s, rows, summary = _settings(args), c.rows, c.summary
    w_bytes, b_bytes = summary["w4a4_bytes"], summary["bf16_bytes"]
    print("[4/4] results (W4A4 vs BF16 on held-out pairs; memory: the quantized Linears of both experts)")
    head = "| pairs | steps | PSNR (dB) | SSIM | latent rel. err | velocity SQNR (dB) | W4A4 / BF16 bytes |"
    print(head)
    print("|" + "|".join("---" for _ in range(7)) + "|")
    print(f"| {len(rows)} | {s['steps']} | {summary['psnr_db']:.2f} | {summary['ssim']:.4f} | "
          f"{summary['latent_rel_err']:.4f} | {summary['velocity_sqnr_db']:.2f} | "
          f"{w_bytes / 2**20:.2f} MiB / {b_bytes / 2**20:.2f} MiB = {summary['memory_ratio']:.3f} |")
    for line in pair_lines(rows):
        print(line)

    from . import mini_pictures as pictures

    out.mkdir(parents=True, exist_ok=True)
    pictures.draw_comparison(figure_pairs(c), out / "demo.png", title=figure_title(len(rows), s["steps"]),
                             legend=pictures.legend_text(summary["pixel_space"]))
    doc = {"what": "wan_w4a4 demo: mini Wan2.2-I2V, W4A4 vs BF16 on held-out pairs (CPU)",
           "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
                        "rank": args.rank, "seed": args.seed, "cfg": 1.0, "threads": args.threads,
                        "quick": bool(args.quick)},
           "summary": summary, "pairs": rows, "states": c.states,
           "startup_and_calibration_s": round(c.t_cal, 2), "total_s": round(time.perf_counter() - t_start, 2)}
    tmp = out / ".demo.json.tmp"
    tmp.write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    tmp.replace(out / "demo.json")
    print(f"wrote {out / 'demo.png'}, {out / 'demo.json'} and the W4A4 states {Path(c.states['high']).name}, "
          f"{Path(c.states['low']).name} ({doc['total_s']:.0f} s in all; start-up and calibration {c.t_cal:.0f} s)")
    if not all(math.isfinite(v) for v in (summary["psnr_db"], summary["ssim"], summary["latent_rel_err"])):
        return _fail("non-finite metrics (see demo.json)", 1)
    return 0


def figure_title(pairs: int, steps: int) -> str:
    return (f"wan_w4a4 demo: the mini Wan2.2-I2V model in BF16 and in W4A4, {pairs} held-out "
            f"(start frame, caption) pair{'s' * (pairs > 1)}, {steps} sampling steps, same noise")


def pair_lines(rows: list) -> list[str]:
    """One printed line per pair, with the numbers (and the words) the figure shows."""
    from .mini_pictures import metric_text

    return [f"pair {i + 1} (held-out seed {r['scene_seed']}): "
            + "; ".join(f"{name.replace('_vs_', ' vs ').replace('bf16', 'BF16').replace('w4a4', 'W4A4')} "
                        f"{metric_text(r['metrics'][name])}" for name in r["metrics"])
            for i, r in enumerate(rows)]


def figure_pairs(c: Comparison) -> list:
    """``mini_pictures.draw_comparison``'s input: per pair its caption and the three labelled rows."""
    from .mini_pictures import metric_notes

    pairs = []
    for r, v in zip(c.rows, c.videos):
        notes = metric_notes(r["metrics"], c.summary.get("pixel_space", "linear VAE"))
        pairs.append((f"held-out seed {r['scene_seed']}: {r['caption']}",
                      [(label, notes[label], v[key]) for key, label in ROW_LABELS.items()]))
    return pairs


def compare(args) -> Comparison:
    """Steps 1-5 of the module doc (no file is written but the calibrated states in ``args.out``);
    raises ``DemoError`` for bad settings or a missing ComfyUI."""
    t_start = time.perf_counter()
    s = _settings(args)
    for k in ("items", "pairs"):
        if s[k] < 1:
            raise DemoError(f"--{k} must be >= 1, got {s[k]}")
    out = Path(args.out)

    try:
        runtime.init_comfyui(args.comfyui, cpu=True)
    except runtime.ComfyUINotFound as e:
        raise DemoError(f"{e}") from None

    from tqdm import tqdm

    from ..calibration import CalibrationConfig, calibrate
    from ..calibration.config import DEFAULT_ALPHAS, DEFAULT_CLIPS
    from ..kernels import format as fmt
    from ..minimodel import data, fidelity
    from ..minimodel import decoder as mini_decoder
    from ..nodes.apply import apply_w4a4_state
    from . import mini_sample as sample
    from .calibrate import _Tqdm, minimodel_items
    try:
        config = CalibrationConfig(steps=s["calib_steps"], cfg=1.0, bins=s["bins"], bin_spacing="steps",
                                   rank=args.rank, rows_per_bin=s["rows_per_bin"],
                                   alphas=s["alphas"] or DEFAULT_ALPHAS, clip_grid=s["clip_grid"] or DEFAULT_CLIPS,
                                   out_dir=str(out), name=STATE_NAME, overwrite=args.overwrite)
    except ValueError as e:
        raise DemoError(str(e)) from None

    heldout = data.heldout_seeds(s["pairs"])
    if not 0 <= args.item_seed <= data.TRAIN_SEED_LIMIT - s["items"]:
        raise DemoError(f"--item-seed must keep the calibration scenes in the training range [0, "
                        f"{data.TRAIN_SEED_LIMIT}), away from the held-out seeds ({heldout[0]}...)")
    paths = sample.embedded_checkpoints()
    print(f"[1/4] loading the mini model's experts from {paths['high'].parent}")
    high, low = sample.load_expert(paths["high"]), sample.load_expert(paths["low"])

    items = minimodel_items(s["items"], seed=args.item_seed)
    print(f"[2/4] calibrating on {len(items)} training-range scene(s) (seeds {args.item_seed}.."
          f"{args.item_seed + len(items) - 1}), {config.steps} steps, {config.bins} bins per expert")
    bar = _Tqdm()
    try:
        result = calibrate(high, low, items, config, progress=bar)
    finally:
        bar.close()
    t_cal = time.perf_counter() - t_start

    states = {e: fmt.load_state(getattr(result, e)) for e in ("high", "low")}
    q = {e: apply_w4a4_state(m, *states[e], source=str(getattr(result, e)))
         for e, m in (("high", high), ("low", low))}
    w_bytes = sum(fidelity.w4a4_bytes(states[e][0]) for e in states)
    b_bytes = sum(fidelity.bf16_bytes(states[e][0]) for e in states)

    print(f"[3/4] sampling {len(heldout)} held-out pair(s) in BF16 and W4A4, {s['steps']} steps each")
    vae = mini_decoder.embedded_vae()  # the learned decoder shipped beside the experts, else the linear VAE
    rows, videos = [], []
    for i, scene_seed in enumerate(tqdm(heldout, desc="pairs", unit="pair")):
        scene = data.sample_scene(scene_seed)
        cap = data.caption(scene)
        video = data.render([scene])[0]
        rec = {e: fidelity.CallRecorder() for e in ("high", "low")}
        z_bf = sample.generate(rec["high"].attach(high), rec["low"].attach(low), cap, video[0],
                               steps=s["steps"], seed=args.seed + i)
        rq = {e: fidelity.CallRecorder(reference=rec[e].calls) for e in ("high", "low")}
        z_q = sample.generate(rq["high"].attach(q["high"]), rq["low"].attach(q["low"]), cap, video[0],
                              steps=s["steps"], seed=args.seed + i)
        v = {"reference": vae.decode_normalized(vae.encode_normalized(video)),
             "bf16": vae.latent_to_rgb(z_bf)[0], "w4a4": vae.latent_to_rgb(z_q)[0]}
        sq = [c.sqnr for e in ("high", "low") for c in rq[e].calls]
        rows.append({"scene_seed": scene_seed, "noise_seed": args.seed + i, "caption": cap,
                     "metrics": fidelity.video_metrics(v),
                     "latent_rel_err": fidelity.rel_err(vae.from_raw(z_bf), vae.from_raw(z_q)),
                     "velocity_sqnr_db_mean": sum(sq) / len(sq),
                     "velocity_sqnr_db_per_call": [(round(c.t, 2), c.sqnr) for e in ("high", "low")
                                                   for c in rq[e].calls]})
        videos.append(v)

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    vs_bf16 = [r["metrics"]["w4a4_vs_bf16"] for r in rows]
    summary = {"psnr_db": mean(m["psnr_db"] for m in vs_bf16), "ssim": mean(m["ssim"] for m in vs_bf16),
               "latent_rel_err": mean(r["latent_rel_err"] for r in rows),
               "velocity_sqnr_db": mean(r["velocity_sqnr_db_mean"] for r in rows),
               **{name: {k: mean(r["metrics"][name][k] for r in rows) for k in ("psnr_db", "ssim")}
                  for name in ("bf16_vs_reference", "w4a4_vs_reference")},
               "w4a4_bytes": w_bytes, "bf16_bytes": b_bytes, "memory_ratio": w_bytes / b_bytes,
               "pixel_space": mini_decoder.describe(vae)}  # PSNR / SSIM: pixels decoded by this; the rest: latents
    return Comparison(rows, videos, summary, {e: str(getattr(result, e)) for e in ("high", "low")}, t_cal)


def _finite(o):
    """JSON-safe copy: non-finite floats as strings ("inf"), tuples as lists."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def main(argv=None) -> int:
    from ..__main__ import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m wan_w4a4.apps.demo", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    add_arguments(p)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
