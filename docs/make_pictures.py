"""Makes the pack's pictures: the template thumbnails, the registry icon and banner.

    python docs/make_pictures.py [--overwrite] [--cards-only] [--comfyui PATH]

- ``example_workflows/<name>.jpg`` for each ``example_workflows/<name>.json`` (the ComfyUI frontend
  shows it in the template browser):
  - ``wan22_mini_w4a4_demo``: frames of the mini model's BF16 and W4A4 videos of one held-out pair,
    made here and now by the demo's own comparison (``apps.demo.compare``: calibration on
    training-range scenes, then both samplings; one to two minutes on a 2-core CPU, needs a ComfyUI tree);
  - the 14B workflows: title cards saying what the workflow does (the repository holds no 14B
    weights, so there is no 14B output to show);
- ``example_workflows/input/wan_w4a4_start_640.jpg``: the 14B workflows' Load Image start picture, which
  the pack copies into ComfyUI's input folder (``nodes/example_inputs.py``): the first frame of a held-out
  mini-model scene (``minimodel.data``) rendered at 640 x 640, the workflows' video size;
- ``docs/icon.png`` (400 x 400) and ``docs/banner.png`` (1280 x 320), named by pyproject's
  ``[tool.comfy]`` Icon and Banner.

Pictures use Pillow's built-in font only (``apps.mini_pictures.Pen``). Existing files are replaced only
with ``--overwrite``; each file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import sys
import tempfile
from pathlib import Path

from wan_w4a4.apps import demo, runtime
from wan_w4a4.apps import mini_pictures as pictures
from wan_w4a4.kernels import format as fmt
from wan_w4a4.minimodel import data

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
THUMB = (512, 368)
JPEG_QUALITY = 85
NAVY, INK, PALE, AMBER = (22, 33, 62), (255, 255, 255), (196, 206, 228), (255, 184, 28)
MINI = "wan22_mini_w4a4_demo"
START = WORKFLOWS / "input" / "wan_w4a4_start_640.jpg"
# A held-out scene (never trained on) picked by eye from the first twelve: a blue diamond and an orange
# square on a yellow and white wavy ground, a clear subject that compresses to about 23 KB.
START_SEED, START_SIZE = data.heldout_seeds(6)[5], 640
# Title cards: what each 14B workflow does, in the words of its own notes.
CARDS = {
    "wan22_i2v_14b_w4a4": ("Wan2.2 I2V 14B in W4A4", [
        "ComfyUI's Wan2.2 image-to-video 14B template",
        "with both experts in 4-bit weights and activations.",
        "4-step LightX2V LoRA path (active) or the",
        "original 20 steps; clip ratios per timestep bin.",
        "Needs the 14B experts and a pair of W4A4 states."]),
    "wan22_i2v_w4a4_calibrate": ("Calibrate W4A4 (Wan2.2 14B)", [
        "Runs your two-expert sampling once in BF16:",
        "timestep-aware SVDQuant + GPTQ, clip ratios",
        "per expert and timestep bin.",
        "Writes <name>_high, <name>_low and a report",
        "to models/w4a4, then renders with them."]),
}


def quantized_wave(box, levels: int = 16, periods: float = 1.5, samples: int = 400):
    """Points of a sine across ``box`` (x0, y0, x1, y1) and of its ``levels``-level rounding: the
    motif of the cards, icon and banner (4 bits: 16 levels)."""
    x0, y0, x1, y1 = box
    wave, steps = [], []
    for i in range(samples + 1):
        u = i / samples
        v = math.sin(2 * math.pi * periods * u)
        q = round((v + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
        x = x0 + u * (x1 - x0)
        wave.append((x, (y0 + y1) / 2 - v * (y1 - y0) / 2))
        steps.append((x, (y0 + y1) / 2 - q * (y1 - y0) / 2))
    return wave, steps


def draw_motif(canvas, box, width: int = 3) -> None:
    from PIL import ImageDraw

    wave, steps = quantized_wave(box)
    d = ImageDraw.Draw(canvas)
    d.line(wave, fill=(70, 86, 124), width=max(1, width - 1))
    d.line(steps, fill=AMBER, width=width)


def title_card(title: str, lines: list[str], pen: pictures.Pen, size=THUMB):
    from PIL import Image

    w, h = size
    img = Image.new("RGB", size, NAVY)
    draw_motif(img, (24, h - 96, w - 24, h - 40), width=2)
    y = 28
    for line in pen.wrap(title, 30, w - 48):
        pen.draw(img, (24, y), line, 30, INK)
        y += pen.line_height(30)
    y += 10
    for line in lines:
        pen.draw(img, (24, y), line, 18, PALE)
        y += pen.line_height(18)
    pen.draw(img, (24, h - 30), "wan-w4a4  |  ComfyUI custom nodes", 15, AMBER)
    return img


def mini_thumbnail(videos: dict, row: dict, steps: int, pen: pictures.Pen, size=THUMB, frames: int = 4):
    """The last ``frames`` latent frames of the BF16 and W4A4 videos in two labelled rows, and the
    W4A4-vs-BF16 numbers of the same run."""
    from PIL import Image

    w, h = size
    img = Image.new("RGB", size, NAVY)
    gap, title_h, label_h = 4, 40, 24
    cell = (w - gap * (frames + 1)) // frames
    pen.draw(img, (gap + 4, 9), "mini Wan2.2-I2V on a CPU: BF16 | W4A4", 20, INK)
    y = title_h
    for key, label in (("bf16", "BF16"), ("w4a4", "W4A4, same noise")):
        pen.draw(img, (gap + 4, y + 3), label, 17, AMBER)
        y += label_h
        for i, frame in enumerate(videos[key][-frames:]):
            tile = pictures.frames_image(frame[None]).resize((cell, cell), Image.LANCZOS)
            img.paste(tile, (gap + i * (cell + gap), y))
        y += cell + gap
    note = f"W4A4 vs BF16: {pictures.metric_text(row['metrics']['w4a4_vs_bf16'])} ({steps} steps)"
    pen.draw(img, (gap + 4, min(y + 4, h - 24)), note, 15, PALE)
    return img


def scaled_scene(scene: data.Scene, k: float) -> data.Scene:
    """``scene`` with every length in pixels multiplied by ``k``: it renders ``k`` times larger, as sharp."""
    shapes = tuple(dataclasses.replace(s, x=s.x * k, y=s.y * k, radius=s.radius * k,
                                       amount=s.amount * k if s.motion in ("slides", "bounces") else s.amount)
                   for s in scene.shapes)
    return dataclasses.replace(scene, shapes=shapes, bg_period=scene.bg_period * k,
                               camera_distance=scene.camera_distance * k)


def start_picture(seed: int = START_SEED, size: int = START_SIZE):
    """The first frame of mini scene ``seed``, rendered at ``size`` x ``size`` (not upscaled)."""
    from PIL import Image

    scene = scaled_scene(data.sample_scene(seed), size / data.WIDTH)
    frame = data.render([scene], frames=1, height=size, width=size)[0, 0]
    return Image.fromarray((frame.clamp(0, 1) * 255 + 0.5).byte().numpy())


def icon(pen: pictures.Pen, size: int = 400):
    from PIL import Image

    img = Image.new("RGB", (size, size), NAVY)
    draw_motif(img, (30, size * 0.62, size - 30, size * 0.9), width=5)
    for text_, px, y, color in (("W4A4", 112, size * 0.16, INK), ("Wan2.2", 44, size * 0.45, AMBER)):
        pen.draw(img, ((size - pen.width(text_, px)) / 2, y), text_, px, color)
    return img


def banner(pen: pictures.Pen, size=(1280, 320)):
    from PIL import Image

    w, h = size
    img = Image.new("RGB", size, NAVY)
    draw_motif(img, (w * 0.66, 50, w - 40, h - 50), width=5)
    pen.draw(img, (56, 52), "Wan2.2 W4A4", 76, INK)
    pen.draw(img, (60, 162), "4-bit weights, 4-bit activations for ComfyUI", 30, AMBER)
    pen.draw(img, (60, 212), "timestep-aware SVDQuant + GPTQ  |  Triton kernels for Hopper", 24, PALE)
    pen.draw(img, (60, 250), "CPU demo on a small trained Wan2.2-I2V model", 24, PALE)
    return img


def encode(img, path: Path) -> bytes:
    buf = io.BytesIO()
    if path.suffix == ".jpg":
        img.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def mini_run(comfyui, threads: int = 1):
    """``demo.compare`` with the demo's default settings on one held-out pair, into a temporary folder."""
    from wan_w4a4.apps.calibrate import torch_threads

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--out", tmp, "--pairs", "1", "--threads", str(threads)]
        args = p.parse_args(argv + (["--comfyui", str(comfyui)] if comfyui else []))
        with torch_threads(args.threads):
            return demo.compare(args), args.steps


def targets(cards_only: bool) -> list[Path]:
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    unknown = [n for n in names if n != MINI and n not in CARDS]
    if unknown:
        raise SystemExit(f"make_pictures: no thumbnail recipe for example_workflows/{unknown[0]}.json "
                         "(add a title card to CARDS)")
    out = [WORKFLOWS / f"{n}.jpg" for n in names if not (cards_only and n == MINI)]
    return out + [START, ROOT / "docs" / "icon.png", ROOT / "docs" / "banner.png"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python docs/make_pictures.py", description=__doc__.splitlines()[0])
    p.add_argument("--overwrite", action="store_true", help="replace existing pictures")
    p.add_argument("--cards-only", action="store_true", help="skip the mini model's thumbnail (no ComfyUI needed)")
    runtime.add_arguments(p, device=False)  # --comfyui, for the mini thumbnail; the demo runs on the CPU
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = targets(args.cards_only)
    existing = [str(q.relative_to(ROOT)) for q in paths if q.exists()]
    if existing and not args.overwrite:  # checked before the minute of sampling
        print(f"make_pictures: refusing to overwrite {', '.join(existing)} (pass --overwrite)", file=sys.stderr)
        return 1
    pen = pictures.Pen()
    images = {"icon": icon(pen), "banner": banner(pen), START.stem: start_picture()}
    images.update({name: title_card(t, lines, pen) for name, (t, lines) in CARDS.items()})
    if not args.cards_only:
        try:
            c, steps = mini_run(args.comfyui)
        except demo.DemoError as e:
            print(f"make_pictures: {e}", file=sys.stderr)
            return e.code
        images[MINI] = mini_thumbnail(c.videos[0], c.rows[0], steps, pen)
    for path in paths:
        encoded = encode(images[path.stem], path)
        path.parent.mkdir(exist_ok=True)
        fmt.write_bytes(path, encoded, overwrite=args.overwrite)
        log.info("wrote %s (%d bytes)", path.relative_to(ROOT), len(encoded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
