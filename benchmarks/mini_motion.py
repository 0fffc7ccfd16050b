"""Do the mini model's generations move as their caption says? A script, not a test.

    python benchmarks/mini_motion.py --threads 2          # CPU, a few minutes at the defaults

The generation metric (``train_log.json`` -> ``generation``) scores pixels, and a shape that moves the right
way but smears scores about as badly as one that does not move. This measures the motion itself. For each
held-out scene (``data.heldout_seeds``) whose first shape slides, bounces, grows or shrinks, or whose camera
pans (then the shape moves on screen by the pan), the shape is tracked by its colour in every pixel frame
(``shape_track``) and its measured motion is compared with the scene's true screen motion
(``data.trajectories``) as ``follow_ratio``: 1 = moves as far as the true shape, in its direction; 0 = does
not move (a still start frame scores 0); negative = the opposite way. Each scene is measured on

- ``rendered``: the rendered video (the tracker's own check; about 1);
- ``reference``: its true latent through the learned decoder (the best a generation can score here);
- ``generated``: sampled from its start frame and true caption (``mini_sample.generate``, as the demo);
- ``flipped caption``: sampled with the same noise from the caption with every motion word turned to its
  opposite (``mini_caption.flip_motions``): a model that takes the motion from the caption scores below 0.

The table gives, per kind of motion, the scenes, the median ratio and the share of scenes whose ratio is above
one half ("moves as captioned"), and both over the moves (slides, bounces, pans) together. The sizes are a
weaker measure: a shape that smears loses its colour, and the tracker then sees it shrink.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path

import _checkout  # noqa: F401  (makes ``import wan_w4a4`` work from a checkout)
from wan_w4a4.apps import runtime  # imports neither comfy nor torch

logger = logging.getLogger("mini_motion")
HERE = Path(__file__).resolve().parent
TAU = 0.3            # RGB distance at which a pixel stops counting as the shape's colour
FOLLOWS = 0.5        # a ratio above this: the shape moved at least half as far as captioned, the right way
COLUMNS = ("rendered", "reference", "generated", "flipped caption")


def motion_kind(scene) -> str | None:
    """What is measured in ``scene``: the first shape's motion when the tracker can see it (``slides``,
    ``bounces``; ``grows``, ``shrinks`` under a still camera, since a pan can carry part of the shape out of the
    picture and change its area), else ``pan`` when the camera moves, else None (a spin in place)."""
    motion = scene.shapes[0].motion
    if motion in ("slides", "bounces") or (motion in ("grows", "shrinks") and not scene.camera):
        return motion
    return "pan" if scene.camera else None


def colour_weight(frames, tones, tau: float = TAU):
    """``[T, H, W]`` in [0, 1]: how close each pixel is to the nearest of ``tones`` ([k, 3] RGB)."""
    import torch

    dist = torch.cdist(frames.reshape(-1, 3).float(), tones.float()).amin(-1)
    return (1 - dist / tau).clamp(0, 1).reshape(frames.shape[:-1])


def shape_track(frames, scene, slot: int = 0, tau: float = TAU):
    """``(centroid [T, 2] (x, y) px, area [T] px)`` of shape ``slot`` in ``frames`` ([T, H, W, 3] in [0, 1]),
    from its two colour tones, less what the same tones weigh in the scene rendered without that shape (the
    background and the other shape), so that background pixels of a similar colour do not pull the centroid."""
    import torch
    from wan_w4a4.minimodel import data

    shape = scene.shapes[slot]
    tones = torch.tensor([data.COLORS[shape.color], data._shade(data.COLORS[shape.color])])
    without = dataclasses.replace(scene, shapes=tuple(s for i, s in enumerate(scene.shapes) if i != slot))
    background = data.render([without], frames=frames.shape[0], height=frames.shape[1], width=frames.shape[2])[0]
    w = (colour_weight(frames, tones, tau) - colour_weight(background, tones, tau)).clamp(min=0)
    area = w.sum((1, 2))
    ys, xs = torch.meshgrid(torch.arange(frames.shape[1]) + 0.5, torch.arange(frames.shape[2]) + 0.5, indexing="ij")
    safe = area.clamp(min=1e-6)
    centroid = torch.stack([(w * xs).sum((1, 2)) / safe, (w * ys).sum((1, 2)) / safe], -1)
    return centroid, area


def true_motion(scene, frames: int, slot: int = 0):
    """``(screen position [T, 2] px, scale [T])`` of shape ``slot`` (``data.trajectories`` less the camera)."""
    import torch
    from wan_w4a4.minimodel import data

    shapes, cam = data.trajectories(scene, frames)
    pos = torch.tensor(shapes[slot, :, :2] - cam, dtype=torch.float32)
    return pos, torch.tensor(shapes[slot, :, 3], dtype=torch.float32)


def follow_ratio(kind: str, centroid, area, pos, scale) -> float:
    """Measured motion over true motion (1 = as far as the true shape and its way; module doc). Moves: the
    measured displacement from frame 0 projected on the true one, at the frame where the true shape is farthest
    (the last frame of a slide, the top of a bounce). Size: the log of the measured area's change over the log
    of the true one. NaN when the shape is not found in a frame it is needed in."""
    if kind in ("grows", "shrinks"):
        if float(area[0]) <= 0 or float(area[-1]) <= 0:
            return float("nan")
        return math.log(float(area[-1] / area[0])) / math.log(float(scale[-1] / scale[0]) ** 2)
    true = pos - pos[0]
    t = int(true.norm(dim=-1).argmax())
    if float(area[0]) <= 0 or float(area[t]) <= 0:
        return float("nan")
    e = true[t]
    return float((centroid[t] - centroid[0]) @ e / (e @ e))


MOVES = ("slides", "bounces", "pan")  # measured by the centroid; sizes by the area (module doc)


def summarize(results: dict) -> list[str]:
    """The markdown table of ``results`` ({kind: {column: [ratio, ...]}}): median ratio and share above FOLLOWS,
    per kind and over ``MOVES``."""
    lines = ["| motion | scenes | " + " | ".join(f"{c}: median ratio, follows" for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    moves = {c: [] for c in COLUMNS}
    for kind in sorted(results):
        for c in COLUMNS:
            if kind in MOVES:
                moves[c] += results[kind][c]
        lines.append(f"| {kind} | {len(results[kind][COLUMNS[0]])} | "
                     + " | ".join(_cell(results[kind][c]) for c in COLUMNS) + " |")
    n = len(moves[COLUMNS[0]])
    lines.append(f"| **moves** ({', '.join(MOVES)}) | {n} | " + " | ".join(_cell(moves[c]) for c in COLUMNS) + " |")
    return lines


def _cell(values: list[float]) -> str:
    import statistics

    found = [v for v in values if not math.isnan(v)]
    if not found:
        return "–"
    follows = sum(v > FOLLOWS for v in found)
    lost = len(values) - len(found)
    return f"{statistics.median(found):+.2f}, {follows}/{len(values)}" + (f" ({lost} lost)" if lost else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=96, help="held-out scenes looked at (default 96; spins without "
                   "a camera pan are skipped)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20, as the generation metric)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--dir", type=Path, default=HERE.parent / "minimodel", help="experts and decoder")
    runtime.add_arguments(p, device=False)
    a = p.parse_args(argv)
    if a.scenes < 1 or a.steps < 1:
        p.error("--scenes and --steps must be >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if not runtime.start_cpu_script("mini_motion", a.comfyui, a.threads):
        return 2
    # the sibling benchmark holds the one definition of a flipped caption
    from mini_caption import flip_motions
    from wan_w4a4.apps import mini_sample as sample
    from wan_w4a4.minimodel import data

    high, low, vae = sample.load_folder(a.dir)
    scenes = [s for s in (data.sample_scene(x) for x in data.heldout_seeds(a.scenes)) if motion_kind(s)]
    results: dict = {}
    for i, scene in enumerate(scenes):
        video = data.render([scene])[0]
        pos, scale = true_motion(scene, video.shape[0])
        videos = {"rendered": video, "reference": vae.decode(vae.encode(video))[0].float()}
        for column, caption in (("generated", data.caption(scene)), ("flipped caption", data.caption(flip_motions(scene)))):
            latent = sample.generate(high, low, caption, video[0], frames=video.shape[0], steps=a.steps,
                                     seed=scene.seed - data.HELDOUT_SEED_BASE)
            videos[column] = vae.decode(latent)[0].float()
        kind = motion_kind(scene)
        row = results.setdefault(kind, {c: [] for c in COLUMNS})
        for column in COLUMNS:
            row[column].append(follow_ratio(kind, *shape_track(videos[column].clamp(0, 1), scene), pos, scale))
        logger.info("[%d/%d] seed %d, %s: %s", i + 1, len(scenes), scene.seed, kind,
                    ", ".join(f"{c} {row[c][-1]:+.2f}" for c in COLUMNS))
    print(f"\nMotion of the mini model's generations against their captions: {len(scenes)} of the first {a.scenes} "
          f"held-out scenes (spins in place skipped), experts and decoder of {a.dir}, {a.steps} euler steps, cfg 1, "
          f"noise seed = scene index, CPU, ComfyUI {runtime.comfyui_tree(a.comfyui)}. Ratio: measured motion over "
          f"the true motion (1 = as the caption and the rendered video; 0 = still; < 0 = the other way); follows: "
          f"ratio > {FOLLOWS}.\n")
    print("\n".join(summarize(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
