"""How much the mini Wan2.2-I2V experts read the caption: a script, not a test.

    python benchmarks/mini_caption.py --threads 2           # CPU, about a minute at the defaults

Question: do the mini model's generations smear moving shapes (``minimodel/strips.png``) because the experts
do not take the motion from the caption? The held-out velocity loss (``apps/mini_train.HeldOut``: the
held-out scenes ``data.heldout_seeds``, fixed noise, stratified timesteps of each expert's range) is measured
on the same videos with four captions:

- ``true``: the scene's own caption;
- ``motions flipped``: the same sentence with every motion word turned to its opposite (``flip_motions``:
  left <-> right, up <-> down, clockwise <-> counterclockwise, grows <-> shrinks, bounces <-> stays still,
  the camera's pan likewise), so shapes, colours and background still match the start frame;
- ``empty``: the empty caption (what classifier-free guidance's negative is, seen in training through
  caption dropout);
- ``another scene's``: the caption of the next held-out scene.

A loss that rises when the motions are flipped means that expert reads the motion from the caption. The
caption gives the kind and direction of each motion; its amount is fixed per kind (``data.SLIDE_PX`` ...), so
the start frame and the caption fix the whole video. (The first data version drew the amounts, which the
caption did not name: ``benchmarks/results/mini_caption_cpu_2026-11-29.log`` was measured on that world.)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import _checkout  # noqa: F401  (makes ``import wan_w4a4`` work from a checkout)
from wan_w4a4.apps import runtime  # imports neither comfy nor torch

logger = logging.getLogger("mini_caption")
HERE = Path(__file__).resolve().parent
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up",
            "clockwise": "counterclockwise", "counterclockwise": "clockwise",
            "grows": "shrinks", "shrinks": "grows", "bounces": "stays still", "stays still": "bounces"}
VARIANTS = ("true", "motions flipped", "empty", "another scene's")


def flip_motions(scene):
    """``scene`` with every motion word of its caption turned to the opposite (``OPPOSITE``); only what
    ``data.caption`` reads changes, so the flipped caption names the same shapes, colours and background."""
    def flip(shape):
        if shape.motion in ("slides", "spins"):
            return dataclasses.replace(shape, direction=OPPOSITE[shape.direction])
        return dataclasses.replace(shape, motion=OPPOSITE[shape.motion])

    return dataclasses.replace(scene, shapes=tuple(flip(s) for s in scene.shapes),
                               camera=OPPOSITE[scene.camera] if scene.camera else "")


def captions(scenes, variant: str) -> list[str]:
    from wan_w4a4.minimodel import data

    if variant == "true":
        return [data.caption(s) for s in scenes]
    if variant == "motions flipped":
        return [data.caption(flip_motions(s)) for s in scenes]
    if variant == "empty":
        return [""] * len(scenes)
    if variant == "another scene's":
        return [data.caption(scenes[(i + 1) % len(scenes)]) for i in range(len(scenes))]
    raise ValueError(f"unknown caption variant {variant!r}; expected one of {VARIANTS}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=16, help="held-out scenes (default 16)")
    p.add_argument("--sigmas", type=int, default=4, help="stratified timesteps per expert range (default 4)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--dir", type=Path, default=HERE.parent / "minimodel", help="folder with the two experts")
    runtime.add_arguments(p, device=False)
    a = p.parse_args(argv)
    if a.scenes < 2 or a.sigmas < 1:
        p.error("--scenes must be >= 2 (another scene's caption) and --sigmas >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if not runtime.start_cpu_script("mini_caption", a.comfyui, a.threads):
        return 2
    from wan_w4a4.apps import mini_train as train
    from wan_w4a4.minimodel import EMBEDDED_FILES, data, text

    paths = {k: a.dir / EMBEDDED_FILES[k] for k in ("high", "low")}
    arch = train.expert_arch(paths["high"])  # checked before the held-out set is rendered
    cfg = train.TrainConfig(out=a.dir, arch=arch, heldout=a.scenes, heldout_sigmas=a.sigmas, batch=a.scenes,
                            chunk=a.scenes, minutes=None, steps=3)
    encoder = text.TextEncoder()
    heldout = train.HeldOut(cfg, data.LinearVideoVAE(), encoder)
    scenes = [data.sample_scene(s) for s in data.heldout_seeds(a.scenes)]
    contexts = {v: encoder.encode(captions(scenes, v)) for v in VARIANTS}
    ranges = train.phase_ranges(cfg.boundary)
    losses = {}
    for name, path in paths.items():
        model = train.load_trained_expert(path)
        for v in VARIANTS:
            heldout.context = contexts[v]
            losses[name, v] = heldout.loss(model, ranges[name])["loss"]
            logger.info("%s expert, %s caption: %.4f", name, v, losses[name, v])
    print(f"\nHeld-out velocity MSE of the mini experts in {a.dir} ({arch.num_layers} blocks) by caption: "
          f"{a.scenes} held-out scenes (seeds {scenes[0].seed}..{scenes[-1].seed}), {a.sigmas} timesteps per "
          f"expert range, CPU, ComfyUI {runtime.comfyui_tree(a.comfyui)}.\n")
    print("| expert | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for name in paths:
        base = losses[name, "true"]
        cells = [f"{losses[name, v]:.4f}" + ("" if v == "true" else f" ({losses[name, v] / base:.2f}x)")
                 for v in VARIANTS]
        print(f"| {name}-noise | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
