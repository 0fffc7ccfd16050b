"""Pictures of the trained mini model: frame strips (generated vs reference) and the loss curve.

    python -m wan_w4a4.apps.mini_pictures --dir DIR [--n 4] [--steps 20] [--cfg 1.0]

``strips.png``: for held-out scenes (seeds never used in training), the reference video (its
latent, decoded by the linear VAE: the best any generation can look) above the video the two
experts generate from its first frame and caption through ComfyUI (``UNETLoader``,
``WanImageToVideo``, ``ModelSamplingSD3`` + two ``KSamplerAdvanced``); one picture per latent frame.
``loss_curve.png``: training loss per phase and held-out loss, from ``train_log.json``.
Needs only Pillow (no matplotlib); the strips need ComfyUI (``wan_w4a4.apps.runtime``).
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

from ..minimodel import data
from ..minimodel import decoder as mini_decoder
from . import mini_sample as sample

logger = logging.getLogger(__name__)

LABEL_W = 46
MIN_FRAME_PX = 96  # frames smaller than this are enlarged (nearest-neighbour) in the comparison figure
BITMAP_PX = 11     # height of Pillow's bitmap default font, the fallback of ``Pen``
PHASE_COLORS = {"warm": (110, 110, 110), "high": (200, 40, 40), "low": (30, 80, 200)}


def frames_image(frames: torch.Tensor, scale: int = 1):
    """``[F, H, W, 3]`` in [0, 1] -> one PIL image, frames side by side, each pixel ``scale`` x ``scale``
    (nearest-neighbour: the pixels the model made, not a smoothed guess)."""
    from PIL import Image

    row = torch.cat(list(frames.float().cpu()), dim=1)
    img = Image.fromarray((row.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8))
    return img if scale == 1 else img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def upscale_factor(height: int, min_px: int = MIN_FRAME_PX) -> int:
    """Whole factor that makes a frame of ``height`` pixels at least ``min_px`` tall."""
    return max(1, math.ceil(min_px / height))


class Pen:
    """Text at a pixel size with Pillow's built-in font: the scalable one (``ImageFont.load_default(size=)``,
    Pillow >= 10.1 with FreeType), else the fixed bitmap font (about ``BITMAP_PX`` tall) enlarged by a
    whole factor with nearest-neighbour, so that labels stay legible on any Pillow."""

    def __init__(self, scalable: bool | None = None):
        from PIL import ImageFont

        if scalable is None:
            try:
                scalable = isinstance(ImageFont.load_default(size=BITMAP_PX), ImageFont.FreeTypeFont)
            except TypeError:  # Pillow < 10.1: no size argument
                scalable = False
        self.scalable = scalable
        self._fonts: dict[int, object] = {}

    def font(self, size: int):
        from PIL import ImageFont

        key = size if self.scalable else 0
        if key not in self._fonts:
            self._fonts[key] = (ImageFont.load_default(size=size) if self.scalable
                                else getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)())
        return self._fonts[key]

    def factor(self, size: int) -> int:
        return 1 if self.scalable else max(1, round(size / BITMAP_PX))

    def width(self, text_: str, size: int) -> int:
        return math.ceil(self.font(size).getbbox(text_)[2] * self.factor(size)) if text_ else 0

    @staticmethod
    def line_height(size: int) -> int:
        return round(size * 1.3)

    def draw(self, canvas, xy, text_: str, size: int, fill=(0, 0, 0)) -> None:
        from PIL import Image, ImageDraw

        x, y = int(xy[0]), int(xy[1])
        if self.scalable:
            ImageDraw.Draw(canvas).text((x, y), text_, fill=fill, font=self.font(size))
            return
        k, font = self.factor(size), self.font(size)
        _, _, right, bottom = font.getbbox(text_)
        mask = Image.new("L", (max(1, right), max(1, bottom)))
        ImageDraw.Draw(mask).text((0, 0), text_, fill=255, font=font)
        mask = mask.resize((mask.width * k, mask.height * k), Image.NEAREST)
        canvas.paste(fill, (x, y, x + mask.width, y + mask.height), mask)

    def wrap(self, text_: str, size: int, width: int) -> list[str]:
        """``text_`` broken at spaces into lines no wider than ``width`` (a longer single word stays whole)."""
        lines, line = [], ""
        for word in text_.split():
            trial = f"{line} {word}".strip()
            if line and self.width(trial, size) > width:
                lines.append(line)
                trial = word
            line = trial
        return lines + [line]


def strip_rows(high, low, seeds, *, steps: int = 20, cfg: float = 1.0, sample_seed: int = 0,
               frames: int = data.FRAMES, vae=None, with_videos: bool = False, sampler_name: str = "euler"):
    """``[(caption, reference [F, H, W, 3], generated [F, H, W, 3])]`` for the scenes of ``seeds``: one
    picture per latent frame, decoded by ``vae`` (default ``decoder.embedded_vae()``); sampled with
    ``steps`` steps of ComfyUI's ``sampler_name`` at guidance ``cfg`` (negative: the empty caption). With
    ``with_videos``, each row also carries ``{"truth", "reference", "generated"}``: all pixel frames
    ``[T, H, W, 3]`` (the rendered video, and the two latents decoded to every frame)."""
    vae = vae if vae is not None else mini_decoder.embedded_vae()
    rows = []
    for i, seed in enumerate(seeds):
        scene = data.sample_scene(seed)
        cap = data.caption(scene)
        video = data.render([scene], frames=frames)[0]
        latent = sample.generate(high, low, cap, video[0], frames=video.shape[0], steps=steps, seed=sample_seed + i,
                                 cfg=cfg, sampler_name=sampler_name)
        # every pixel frame [T, H, W, 3] (the linear VAE holds each latent frame for the frames it covers);
        # the pictures are frames 0, 4, 8, ..., which is latent_to_rgb for both VAEs
        ref_all, gen_all = (vae.decode(raw)[0].float().cpu() for raw in (vae.encode(video), latent))
        row = (cap, mini_decoder.last_of_groups(ref_all), mini_decoder.last_of_groups(gen_all))
        if with_videos:
            row += ({"truth": video, "reference": ref_all, "generated": gen_all},)
        rows.append(row)
    return rows


def psnr_per_frame(video: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """PSNR (dB, peak 1) of each frame of ``video`` against ``truth``, both ``[T, H, W, 3]`` in [0, 1]."""
    mse = ((video.float() - truth.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1.0 / mse)).tolist()


def generation_metrics(rows, *, seeds, steps: int, cfg: float, vae_name: str, device: str,
                       sampler: str = "euler") -> dict:
    """The held-out generation metric from ``strip_rows(..., with_videos=True)``: per pixel frame, the PSNR
    against the rendered ground-truth video, averaged over scenes, of
    - ``generated``: the two experts' video from the start frame and caption;
    - ``reference``: the ground-truth latent decoded (the best a generation can score through this decoder);
    - ``still``: the decoded start frame held for every frame (what a generation that ignores the caption's
      motion scores; frame 0 equals the reference's).
    ``mean_after_start`` averages frames 1.. (frame 0 is given). ``steps``, ``cfg`` and ``sampler``: what
    ``strip_rows`` sampled with, recorded as given (``cfg`` has no default, so that the record cannot
    claim a guidance that was not used)."""
    curves = {"generated": [], "reference": [], "still": []}
    for row in rows:
        v = row[3]
        curves["generated"].append(psnr_per_frame(v["generated"], v["truth"]))
        curves["reference"].append(psnr_per_frame(v["reference"], v["truth"]))
        still = v["reference"][:1].expand_as(v["truth"])
        curves["still"].append(psnr_per_frame(still, v["truth"]))
    out = {"what": ("held-out I2V generations: PSNR (dB) per pixel frame against the rendered video, pixel space "
                    f"({vae_name}), mean over scenes"), "pixel_space": vae_name, "scene_seeds": list(seeds),
           "sampling_steps": steps, "sampler": sampler, "cfg": float(cfg), "device": device}
    for k, c in curves.items():
        per = np.mean(np.array(c), axis=0)
        out[k] = {"per_frame_psnr_db": [round(float(x), 3) for x in per],
                  "mean_after_start_psnr_db": float(np.mean(per[1:])) if len(per) > 1 else float(per[0])}
    # block seams (decoder.seam_ratio: |difference| across 8 x 8 block edges over inside; 1 = none) of the
    # frames after the start frame; the rendered videos' own ratio is the floor
    after = {k: torch.stack([row[3][k][1:] for row in rows]) for k in ("truth", "reference", "generated")}
    out["seam_ratio_after_start"] = {k: round(mini_decoder.seam_ratio(v), 4) for k, v in after.items()}
    return out


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
            canvas.paste(frames_image(frames), (LABEL_W, y))
            draw.text((6, y + h_row // 2 - 6), label, fill=(0, 0, 0))
            y += h_row
        y += 6
    canvas.save(path)
    return Path(path)


TITLE_PX, CAPTION_PX, LABEL_PX, NOTE_PX = 20, 17, 20, 14  # text sizes of the comparison figure, in pixels
FRAME_GAP = 4
def legend_text(space: str = "linear VAE") -> str:
    """The comparison figure's legend; ``space``: what decoded the latents (``decoder.describe``)."""
    return ("PSNR in dB (higher is closer, inf = identical) and SSIM (Wang et al. 2004: 11 x 11 Gaussian window, "
            "sigma 1.5, K1 0.01, K2 0.03; 1 = identical) of each video against the one named, over all its frames, "
            f"in pixel space (latents decoded by the mini model's {space}). reference: the held-out video through "
            f"the encoder and the {space}, the best any generation can look. BF16: the checkpoints' weights "
            "unquantized; W4A4: 4-bit weights and activations. One picture per latent frame (frame k: pixel "
            + ("frame 4k)." if space != "linear VAE" else "frames 4k-3..4k)."))


LEGEND = legend_text()


def metric_text(m: dict) -> str:
    return f"PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim']:.4f}"


def metric_notes(metrics: dict, space: str = "linear VAE") -> dict[str, list[str]]:
    """The lines under each row label of the comparison figure, from ``fidelity.video_metrics``
    (the demo prints the same lines); ``space``: what decoded the latents."""
    return {"reference": ["held-out video through", f"the {space}"],
            "BF16": ["vs reference:", metric_text(metrics["bf16_vs_reference"])],
            "W4A4": ["vs reference:", metric_text(metrics["w4a4_vs_reference"]),
                     "vs BF16:", metric_text(metrics["w4a4_vs_bf16"])]}


def column_labels(frames: int) -> list[str]:
    return ["frame 0 (start)"] + [f"frame {i}" for i in range(1, frames)]


def comparison_layout(pairs, *, title: str, legend: str, pen: Pen):
    """``(size, ops)``: the canvas size and the drawing operations of ``draw_comparison`` — ("text", x, y,
    text, px) and ("frame", x, y, frame [H, W, 3], scale) — so that the layout can be checked without
    reading pixels."""
    f0 = pairs[0][1][0][2]
    nf, fh, fw = f0.shape[:3]
    k = upscale_factor(fh)
    cell = fw * k + FRAME_GAP
    pad = 10
    label_w = 2 * pad + max(max(pen.width(label, LABEL_PX), *(pen.width(n, NOTE_PX) for n in notes))
                            for _, rows in pairs for label, notes, _ in rows)
    w = label_w + nf * cell + pad
    ops, y = [], pad
    for line in pen.wrap(title, TITLE_PX, w - 2 * pad):
        ops.append(("text", pad, y, line, TITLE_PX))
        y += pen.line_height(TITLE_PX)
    for line in pen.wrap(legend, NOTE_PX, w - 2 * pad):
        ops.append(("text", pad, y, line, NOTE_PX))
        y += pen.line_height(NOTE_PX)
    for caption, rows in pairs:
        y += pad
        for line in pen.wrap(caption, CAPTION_PX, w - 2 * pad):
            ops.append(("text", pad, y, line, CAPTION_PX))
            y += pen.line_height(CAPTION_PX)
        for i, label in enumerate(column_labels(nf)):
            ops.append(("text", label_w + i * cell + (cell - FRAME_GAP - pen.width(label, NOTE_PX)) // 2, y,
                        label, NOTE_PX))
        y += pen.line_height(NOTE_PX)
        for label, notes, frames in rows:
            if tuple(frames.shape) != tuple(f0.shape):
                raise ValueError(f"row {label!r} of {caption!r}: frames {tuple(frames.shape)}, the first row "
                                 f"has {tuple(f0.shape)}")
            ty = y + 4
            ops.append(("text", pad, ty, label, LABEL_PX))
            ty += pen.line_height(LABEL_PX)
            for n in notes:
                ops.append(("text", pad, ty, n, NOTE_PX))
                ty += pen.line_height(NOTE_PX)
            for i, frame in enumerate(frames):
                ops.append(("frame", label_w + i * cell, y, frame, k))
            y = max(y + fh * k, ty) + FRAME_GAP
    return (w, y + pad), ops


def draw_comparison(pairs, path, *, title: str, legend: str = LEGEND, pen: Pen | None = None) -> Path:
    """Writes the demo's figure to ``path``: ``title`` and ``legend`` on top, then per pair its caption,
    the column labels and one row per video (label, note lines such as ``metric_notes``, the frames,
    enlarged to ``MIN_FRAME_PX`` if smaller). ``pairs``: [(caption, [(label, notes, frames [F, H, W, 3]),
    ...]), ...]."""
    from PIL import Image

    pen = pen or Pen()
    size, ops = comparison_layout(pairs, title=title, legend=legend, pen=pen)
    canvas = Image.new("RGB", size, "white")
    for kind, x, y, what, arg in ops:
        if kind == "text":
            pen.draw(canvas, (x, y), what, arg)
        else:
            canvas.paste(frames_image(what[None], arg), (x, y))
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
    prev = log.get("continued_from")
    start = "warm start" if prev is None else "start"
    joined = log.get("joined")
    if joined:  # two one-expert runs side by side (mini_train.join_expert_runs)
        videos = " and ".join(str(joined[k]["data"]["videos_rendered"]) for k in ("high", "low"))
        lines = [(f"Trained on {env['device']} (torch {env['torch']}, ComfyUI {env['comfyui']}), the two experts "
                  f"side by side in two runs of {joined['high']['wall_s']:.0f} and {joined['low']['wall_s']:.0f} s "
                  f"(`--expert high`, `--expert low`, joined by `--join`): high-noise expert {plan['high']} steps, "
                  f"low-noise expert {plan['low']}, batch {log['config']['batch']}, {videos} videos rendered.")]
    else:
        lines = [(f"Trained on {env['device']} (torch {env['torch']}, ComfyUI {env['comfyui']}) in "
                  f"{log['wall_s']:.0f} s: warm start {plan['warm']} steps, high-noise expert {plan['high']}, "
                  f"low-noise expert {plan['low']}, batch {log['config']['batch']}, "
                  f"{log['data']['videos_rendered']} videos rendered.")]
    if prev is not None:
        earlier = prev.get("log") or {}
        lines.append("Continued from the experts of an earlier run (DIR0" +
                      (f": {earlier['wall_s']:.0f} s, plan {earlier['plan']}, replay "
                       f"`{earlier['replay']}`" if earlier.get("plan") else "") +
                      "); the start column below is those experts.")
    if joined:
        decoder = (log.get("decoder") or {}).get("replay")
        lines += [f"Replay: `python -m wan_w4a4.apps.mini_train --out DIR_H {joined['high']['replay']}` and "
                  f"`... --out DIR_L {joined['low']['replay']}`, then `--out DIR --join DIR_H DIR_L`"
                  + (f", then `--out DIR {decoder}`" if decoder else "") + ".", ""]
    else:
        lines += [f"Replay: `python -m wan_w4a4.apps.mini_train --out DIR {log['replay']}`.", ""]
    speed = [f"{k}: {v['steps_per_s']:.3g} steps/s, {v['samples_per_s']:.4g} samples/s, "
             f"{v['tokens_per_s']:.4g} tokens/s" for k, v in log["phases"].items() if v]
    if speed:
        lines += ["Throughput: " + "; ".join(speed) + ".", ""]
    lines += [("Held-out velocity MSE (held-out seeds, fixed noise, "
               f"{log['config']['heldout_sigmas']} stratified timesteps per range; untrained = the initialisation, "
               "whose zero output head predicts v = 0):"), "",
              f"| expert | timesteps | untrained | {start} | trained | trained / untrained |",
              "|---|---|---|---|---|---|"]
    for name, rng in (("high", "t >= 900"), ("low", "t < 900")):
        h = log["heldout"][name]
        lines.append(f"| {name}-noise | {rng} | {h['untrained']:.4f} | {h['warm_start']:.4f} | {h['trained']:.4f} "
                     f"| {h['ratio_trained_to_untrained']:.3f} |")
    lines += ["", "Per timestep (the strata are uniform in u, as the steps of ComfyUI's simple schedule with shift 8):",
              "", f"| expert | sigma | t | untrained | {start} | trained |", "|---|---|---|---|---|---|"]
    for name in ("high", "low"):
        per = log["heldout"][name]["per_sigma"]
        for (s, u), (_, w), (_, t) in zip(per["untrained"], per["warm_start"], per["trained"]):
            lines.append(f"| {name} | {s:.4f} | {1000 * s:.0f} | {u:.4f} | {w:.4f} | {t:.4f} |")
    weights = {k: v["weights"] for k, v in log["phases"].items() if v and "weights" in v}
    if weights:
        lines += ["", "Weights kept per phase (held-out loss of the raw weights vs their EMA): " + "; ".join(
            f"{k}: {w['kept']} ({w['raw']:.4f} vs {w['ema']:.4f})" if w.get("ema") is not None
            else f"{k}: raw ({w['raw']:.4f})" for k, w in weights.items()) + "."]
    dec = log.get("decoder")
    if dec:
        h = dec["heldout"]
        lines += ["", (f"Learned decoder: {dec['steps']} steps of {dec['batch']} videos in {dec['seconds']:.0f} s. "
                       f"Held-out pixel PSNR against the rendered frames (all {log['config']['frames']} frames): "
                       f"{h['learned_clean_psnr_db']:.2f} dB (linear decoder {h['linear_clean_psnr_db']:.2f} dB) from "
                       f"the true latents, {h['learned_perturbed_psnr_db']:.2f} dB (linear "
                       f"{h['linear_perturbed_psnr_db']:.2f} dB) from latents with Gaussian noise of std "
                       f"{h['perturbation_std']:g}.")]
    gen = log.get("generation")
    if gen:
        n = len(gen["generated"]["per_frame_psnr_db"])
        lines += ["", (f"Held-out generation ({len(gen['scene_seeds'])} scenes, {gen['sampling_steps']} "
                       f"{gen.get('sampler', 'euler')} steps, "
                       f"cfg {gen['cfg']:g}, on {gen['device']}): PSNR (dB) of each pixel frame against the rendered "
                       f"video, decoded by the {gen['pixel_space']}; reference = the true latent "
                       "decoded, still = the start frame held:"), "",
                  "| video | " + " | ".join(str(i) for i in range(n)) + " | mean of 1.. |",
                  "|---|" + "---|" * (n + 1)]
        for k in ("generated", "reference", "still"):
            g = gen[k]
            lines.append(f"| {k} | " + " | ".join(f"{v:.1f}" for v in g["per_frame_psnr_db"])
                         + f" | {g['mean_after_start_psnr_db']:.2f} |")
    lines += ["", "| file | bytes | sha256 |", "|---|---|---|"]
    files = list(log["checkpoints"].values()) + ([dec["file"]] if dec and "file" in dec else [])
    for c in files:
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


def make_all(folder, n: int = 4, steps: int = 20, cfg: float = 1.0, generation: int = 8) -> list[Path]:
    """Writes ``loss_curve.png`` and ``strips.png`` into ``folder`` (which holds the checkpoints,
    ``train_log.json`` and ``decoder.safetensors`` if trained), samples ``max(n, generation)`` held-out
    scenes, records ``generation_metrics`` of the first ``generation`` as ``"generation"`` in
    ``train_log.json``, and refreshes the results block of ``folder/README.md``, if any."""
    folder = Path(folder)
    out = []
    frames = data.FRAMES
    log_path = folder / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else None
    if log is not None:
        frames = int(log.get("config", {}).get("frames", frames))  # the clip length it was trained on
    high, low, vae = sample.load_folder(folder)
    seeds = data.heldout_seeds(max(n, generation))
    rows = strip_rows(high, low, seeds, steps=steps, cfg=cfg, frames=frames, vae=vae, with_videos=generation > 0)
    if log is not None and generation > 0:
        device = str(high.load_device) if hasattr(high, "load_device") else "cpu"
        log["generation"] = generation_metrics(rows[:generation], seeds=seeds[:generation], steps=steps, cfg=cfg,
                                               vae_name=mini_decoder.describe(vae), device=device)
        tmp = log_path.with_name(f".{log_path.name}.tmp")
        tmp.write_text(json.dumps(log, indent=1))
        tmp.replace(log_path)
        g = log["generation"]
        logger.info("held-out generation PSNR after the start frame: %.2f dB (reference %.2f dB, still start "
                    "frame %.2f dB)", *(g[k]["mean_after_start_psnr_db"] for k in ("generated", "reference", "still")))
        logger.info("block-seam ratio after the start frame (1 = none): generated %.2f, reference %.2f, rendered "
                    "%.2f", *(g["seam_ratio_after_start"][k] for k in ("generated", "reference", "truth")))
    if log is not None:
        out.append(draw_loss_curve(log, folder / "loss_curve.png"))
        if update_card(folder):
            out.append(folder / "README.md")
    out.append(draw_strips([r[:3] for r in rows[:n]], folder / "strips.png"))
    logger.info("wrote %s", ", ".join(map(str, out)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_w4a4.apps.mini_pictures", description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, type=Path, help="folder with the two checkpoints and train_log.json")
    p.add_argument("--n", type=int, default=4, help="held-out scenes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--generation", type=int, default=8, help="held-out scenes of the generation metric "
                   "(written into train_log.json; 0: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_all(args.dir, n=args.n, steps=args.steps, cfg=args.cfg, generation=args.generation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
