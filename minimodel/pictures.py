"""Pictures of the trained mini model: frame strips (generated vs reference) and the loss curve.

    python -m wan_w4a4.minimodel.pictures --dir DIR [--n 4] [--steps 20] [--cfg 1.0]

``strips.png``: for held-out scenes (seeds never used in training), the reference video (its
latent, decoded by the linear VAE: the best any generation can look) above the video the two
experts generate from its first frame and caption through ComfyUI (``UNETLoader``,
``WanImageToVideo``, ``ModelSamplingSD3`` + two ``KSamplerAdvanced``); one picture per latent frame.
``loss_curve.png``: training loss per phase and held-out loss, from ``train_log.json``.
Needs only Pillow (no matplotlib); the strips need ComfyUI (``wan_w4a4.nodes.runtime``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch

from . import data

logger = logging.getLogger(__name__)

LABEL_W = 46
PHASE_COLORS = {"warm": (110, 110, 110), "high": (200, 40, 40), "low": (30, 80, 200)}


def _to_image(frames: torch.Tensor):
    """``[F, H, W, 3]`` in [0, 1] -> one PIL image, frames side by side."""
    from PIL import Image

    row = torch.cat(list(frames.float().cpu()), dim=1)
    return Image.fromarray((row.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8))


def strip_rows(high, low, seeds, *, steps: int = 20, cfg: float = 1.0, sample_seed: int = 0,
               frames: int = data.FRAMES):
    """``[(caption, reference [F, H, W, 3], generated [F, H, W, 3])]`` for the scenes of ``seeds``."""
    from .sample import generate

    vae = data.LinearVideoVAE()
    rows = []
    for i, seed in enumerate(seeds):
        scene = data.sample_scene(seed)
        cap = data.caption(scene)
        video = data.render([scene], frames=frames)[0]
        reference = vae.decode_normalized(vae.encode_normalized(video))
        latent = generate(high, low, cap, video[0], frames=video.shape[0], steps=steps, seed=sample_seed + i, cfg=cfg)
        rows.append((cap, reference, vae.latent_to_rgb(latent)[0]))
    return rows


def _wrap(draw, text_, width: int) -> list[str]:
    lines, line = [], ""
    for word in text_.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial) > width:
            lines.append(line)
            trial = word
        line = trial
    return lines + [line]


def draw_strips(rows, path):
    """Writes the strips picture of ``strip_rows`` output to ``path``."""
    from PIL import Image, ImageDraw

    line_h = 13
    w = LABEL_W + rows[0][1].shape[0] * rows[0][1].shape[2]
    h_row = rows[0][1].shape[1]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_wrap(measure, cap, w - 8) for cap, _, _ in rows]
    height = sum(len(c) * line_h + 4 + 2 * h_row + 6 for c in captions)
    canvas = Image.new("RGB", (w, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (cap, ref, gen), lines in zip(rows, captions):
        for line in lines:
            draw.text((4, y + 2), line, fill=(0, 0, 0))
            y += line_h
        y += 4
        for label, frames in (("ref", ref), ("gen", gen)):
            canvas.paste(_to_image(frames), (LABEL_W, y))
            draw.text((6, y + h_row // 2 - 6), label, fill=(0, 0, 0))
            y += h_row
        y += 6
    canvas.save(path)
    return Path(path)


def draw_loss_curve(log: dict, path, size=(900, 420)):
    """Training loss (per phase, averaged over logging windows) and held-out loss vs global step,
    log-scale loss axis; writes ``path``."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 60, 170, 20, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(c["global_step"], c["loss"]) for c in log["curve"]]
    held = [(c["global_step"], c["loss"], c["phase"], c["range"]) for c in log.get("heldout_curve", [])]
    values = [p[1] for p in pts] + [p[1] for p in held]
    for h in log.get("heldout", {}).values():
        values.append(h["untrained"])
    lo, hi = math.log10(min(values) * 0.9), math.log10(max(values) * 1.1)
    xmax = max(p[0] for p in pts)

    def xy(step, loss):
        x = left + (W - left - right) * step / xmax
        y = top + (H - top - bottom) * (hi - math.log10(loss)) / (hi - lo)
        return x, y

    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for k in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 1.5, 2, 3, 5, 7):
            v = m * 10 ** k
            if lo <= math.log10(v) <= hi:
                _, y = xy(0, v)
                d.line([left - 4, y, left, y], fill=(0, 0, 0))
                d.text((4, y - 6), f"{v:g}", fill=(0, 0, 0))
    for s in np.linspace(0, xmax, 6):
        x, _ = xy(s, 10 ** hi)
        d.text((x - 10, H - bottom + 6), f"{int(s)}", fill=(0, 0, 0))
    d.text((W // 2 - 60, H - 16), "optimizer step (all phases)", fill=(0, 0, 0))
    for phase, color in PHASE_COLORS.items():
        seg = [xy(s, l) for (s, l), c in zip(pts, log["curve"]) if c["phase"] == phase]
        if len(seg) > 1:
            d.line(seg, fill=color, width=2)
    for rng, color in (("high", (240, 140, 0)), ("low", (0, 160, 160))):
        seg = [xy(s, l) for s, l, _, r in held if r == rng]
        for p in seg:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], outline=color, width=2)
        h = log.get("heldout", {}).get(rng)
        if h:
            _, y = xy(0, h["untrained"])
            d.line([left, y, W - right, y], fill=color, width=1)
    legend = [("train, warm start", PHASE_COLORS["warm"]), ("train, high-noise", PHASE_COLORS["high"]),
              ("train, low-noise", PHASE_COLORS["low"]), ("held-out, t >= 900", (240, 140, 0)),
              ("held-out, t < 900", (0, 160, 160)), ("lines: untrained", (0, 0, 0))]
    for i, (label, color) in enumerate(legend):
        y = top + 6 + 18 * i
        d.rectangle([W - right + 10, y + 3, W - right + 22, y + 9], fill=color)
        d.text((W - right + 28, y), label, fill=(0, 0, 0))
    d.text((left + 6, top + 4), "velocity MSE (log scale)", fill=(0, 0, 0))
    img.save(path)
    return Path(path)


CARD_BEGIN, CARD_END = "<!-- results:begin -->", "<!-- results:end -->"


def results_markdown(log: dict) -> str:
    """The card's results section, from ``train_log.json``."""
    env, plan = log["environment"], log["plan"]
    lines = [f"Trained on {env['device']} (torch {env['torch']}, ComfyUI {env['comfyui']}) in {log['wall_s']:.0f} s: "
             f"warm start {plan['warm']} steps, high-noise expert {plan['high']}, low-noise expert {plan['low']}, "
             f"batch {log['config']['batch']}, {log['data']['videos_rendered']} videos rendered.",
             f"Replay: `python -m wan_w4a4.minimodel.train --out DIR {log['replay']}`.", ""]
    speed = [f"{k}: {v['steps_per_s']:.3g} steps/s, {v['samples_per_s']:.4g} samples/s, "
             f"{v['tokens_per_s']:.4g} tokens/s" for k, v in log["phases"].items() if v]
    if speed:
        lines += ["Throughput: " + "; ".join(speed) + ".", ""]
    lines += ["Held-out velocity MSE (held-out seeds, fixed noise, "
              f"{log['config']['heldout_sigmas']} stratified timesteps per range; untrained = the initialisation, "
              "whose zero output head predicts v = 0):", "",
              "| expert | timesteps | untrained | warm start | trained | trained / untrained |",
              "|---|---|---|---|---|---|"]
    for name, rng in (("high", "t >= 900"), ("low", "t < 900")):
        h = log["heldout"][name]
        lines.append(f"| {name}-noise | {rng} | {h['untrained']:.4f} | {h['warm_start']:.4f} | {h['trained']:.4f} "
                     f"| {h['ratio_trained_to_untrained']:.3f} |")
    lines += ["", "Per timestep (the strata are uniform in u, as the steps of ComfyUI's simple schedule with shift 8):",
              "", "| expert | sigma | t | untrained | warm start | trained |", "|---|---|---|---|---|---|"]
    for name in ("high", "low"):
        per = log["heldout"][name]["per_sigma"]
        for (s, u), (_, w), (_, t) in zip(per["untrained"], per["warm_start"], per["trained"]):
            lines.append(f"| {name} | {s:.4f} | {1000 * s:.0f} | {u:.4f} | {w:.4f} | {t:.4f} |")
    lines += ["", "| file | bytes | sha256 |", "|---|---|---|"]
    for c in log["checkpoints"].values():
        lines.append(f"| `{c['file']}` | {c['bytes']} | `{c['sha256'][:16]}…` |")
    return "\n".join(lines)


def update_card(folder) -> bool:
    """Replaces the results block of ``folder/README.md`` (between the markers) with
    ``results_markdown`` of ``folder/train_log.json``; returns whether it did."""
    folder = Path(folder)
    card, log_path = folder / "README.md", folder / "train_log.json"
    if not (card.is_file() and log_path.is_file()):
        return False
    text_ = card.read_text()
    if CARD_BEGIN not in text_ or CARD_END not in text_:
        return False
    head, rest = text_.split(CARD_BEGIN, 1)
    _, tail = rest.split(CARD_END, 1)
    new = f"{head}{CARD_BEGIN}\n{results_markdown(json.loads(log_path.read_text()))}\n{CARD_END}{tail}"
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(new)
    tmp.replace(card)
    return True


def make_all(folder, n: int = 4, steps: int = 20, cfg: float = 1.0) -> list[Path]:
    """Writes ``loss_curve.png`` and ``strips.png`` into ``folder`` (which holds the checkpoints
    and ``train_log.json``) and refreshes the results block of its ``README.md``, if any."""
    from .sample import load_expert
    from .train import EXPERT_FILES

    folder = Path(folder)
    out = []
    frames = data.FRAMES
    log_path = folder / "train_log.json"
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        frames = int(log.get("config", {}).get("frames", frames))  # the clip length it was trained on
        out.append(draw_loss_curve(log, folder / "loss_curve.png"))
        if update_card(folder):
            out.append(folder / "README.md")
    high, low = (load_expert(folder / EXPERT_FILES[k]) for k in ("high", "low"))
    rows = strip_rows(high, low, data.heldout_seeds(n), steps=steps, cfg=cfg, frames=frames)
    out.append(draw_strips(rows, folder / "strips.png"))
    logger.info("wrote %s", ", ".join(map(str, out)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_w4a4.minimodel.pictures", description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, type=Path, help="folder with the two checkpoints and train_log.json")
    p.add_argument("--n", type=int, default=4, help="held-out scenes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=1.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_all(args.dir, n=args.n, steps=args.steps, cfg=args.cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
