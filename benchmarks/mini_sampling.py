"""Sampling settings of the mini Wan2.2-I2V model against its held-out generation metric: a script, not a test.

    python benchmarks/mini_sampling.py --threads 2                       # CPU, about 10 minutes
    python benchmarks/mini_sampling.py --strips results/x.png --strips-setting euler,40,3.5

Question: do the moving shapes of the mini model's generations (``minimodel/strips.png``) smear because
of the sampling (20 euler steps, simple schedule, cfg 1 everywhere), not the experts? For each setting
(sampler, steps, cfg) it samples the held-out scenes of ``train_log.json``'s ``"generation"`` entry
(seeds ``data.heldout_seeds``) with the shipped experts through ComfyUI's own nodes
(``mini_pictures.strip_rows``: WanImageToVideo -> ModelSamplingSD3 shift 8 -> 2 x KSamplerAdvanced, split
at t = 900; negative = the empty caption, which training saw through caption dropout), decodes them with
the shipped learned decoder and prints, from ``mini_pictures.generation_metrics`` (the same definitions):

- PSNR after the start frame (frames 1..16, dB, mean over scenes), once per noise-seed set (scene i uses
  noise seed ``s + i``; ``s = 0`` is the metric's own), so that the spread between noise draws is visible;
- PSNR of the last four frames (13..16), where the smearing is worst;
- ``moving PSNR``: PSNR over only the pixels whose rendered value changes from frame 0 by more than 0.1
  (any channel), frames 1.. pooled over scenes: the moving shapes (and, under a camera pan, the background);
- the block-seam ratio after the start frame (``decoder.seam_ratio``; rendered videos 1.00);
- seconds per video (sampling and decoding, after a warm-up generation), at ``--threads`` torch threads.

``--strips PATH`` also draws ``mini_pictures.draw_strips`` for the first ``--strip-scenes`` scenes with
cfg-1 euler-20 rows and the ``--strips-setting`` rows interleaved (noise seed set 0).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401  (makes ``import wan_w4a4`` work from a checkout)
from wan_w4a4.apps import runtime  # imports neither comfy nor torch

logger = logging.getLogger("mini_sampling")
HERE = Path(__file__).resolve().parent
BASELINE = ("euler", 20, 1.0)
DEFAULT_GRID = ("euler,20,1 euler,20,2 euler,20,3.5 euler,40,1 euler,40,2 euler,40,3.5 "
                "uni_pc,20,1 uni_pc,20,2 uni_pc,20,3.5 dpmpp_2m,20,1 dpmpp_2m,20,2 dpmpp_2m,20,3.5")
MOVING_THRESHOLD = 0.1


def parse_setting(text: str) -> tuple[str, int, float]:
    """``"euler,20,3.5"`` -> ``("euler", 20, 3.5)``; a clear error otherwise."""
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"setting {text!r}: expected sampler,steps,cfg (e.g. euler,20,3.5)")
    sampler, steps, cfg = parts[0].strip(), int(parts[1]), float(parts[2])
    if steps < 1 or cfg <= 0:
        raise argparse.ArgumentTypeError(f"setting {text!r}: need steps >= 1 and cfg > 0")
    return sampler, steps, cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=DEFAULT_GRID, help="space-separated sampler,steps,cfg settings")
    p.add_argument("--scenes", type=int, default=8, help="held-out scenes (default 8, as train_log's generation)")
    p.add_argument("--noise-seeds", default="0,1000", help="first noise seed of each seed set (scene i: s + i)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--dir", type=Path, default=HERE.parent / "minimodel", help="experts, decoder and train_log.json")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here (new file only)")
    p.add_argument("--strips", type=Path, default=None, help="write a strips picture here (new file only)")
    p.add_argument("--strips-setting", type=parse_setting, default=None,
                   help="sampler,steps,cfg drawn beside euler,20,1 in --strips (default: best PSNR of the grid)")
    p.add_argument("--strip-scenes", type=int, default=4)
    runtime.add_arguments(p, device=False)
    a = p.parse_args(argv)
    a.grid = [parse_setting(s) for s in a.grid.split()]
    a.noise_seeds = [int(s) for s in a.noise_seeds.split(",")]
    for path in (a.json, a.strips):
        if path is not None and path.exists():
            p.error(f"{path} exists; choose a new name (results are not overwritten)")
    if a.scenes < 1 or a.strip_scenes < 1:
        p.error("--scenes and --strip-scenes must be >= 1")
    return a


def moving_psnr(rows) -> float:
    """PSNR (dB) of the generated frames 1.. over the pixels whose rendered value moved away from frame 0 by
    more than ``MOVING_THRESHOLD`` in some channel, pooled over scenes (``strip_rows(..., with_videos=True)``)."""
    import torch

    se, n = 0.0, 0
    for row in rows:
        v = row[3]
        truth, gen = v["truth"][1:].float(), v["generated"][1:].float()
        mask = ((truth - v["truth"][:1].float()).abs().amax(-1, keepdim=True) > MOVING_THRESHOLD).expand_as(truth)
        se += float(((gen - truth) ** 2)[mask].sum())
        n += int(mask.sum())
    return float(10 * torch.log10(torch.tensor(n / max(se, 1e-12)))) if n else float("nan")


def measure(high, low, vae, seeds, setting, noise_seed: int) -> dict:
    """One setting on one noise-seed set: the metric of ``generation_metrics`` plus the extra columns."""
    import numpy as np
    from wan_w4a4.apps import mini_pictures as pictures
    from wan_w4a4.minimodel import decoder as mini_decoder

    sampler, steps, cfg = setting
    t = time.perf_counter()
    rows = pictures.strip_rows(high, low, seeds, steps=steps, cfg=cfg, sample_seed=noise_seed, vae=vae,
                               with_videos=True, sampler_name=sampler)
    s_per_video = (time.perf_counter() - t) / len(seeds)
    m = pictures.generation_metrics(rows, seeds=seeds, steps=steps, cfg=cfg, sampler=sampler,
                                    vae_name=mini_decoder.describe(vae), device="cpu")
    m["noise_seed"] = noise_seed
    m["last4_psnr_db"] = float(np.mean(m["generated"]["per_frame_psnr_db"][-4:]))
    m["moving_psnr_db"] = moving_psnr(rows)
    m["s_per_video"] = s_per_video
    return m, rows


def _mean(per_seed, key) -> float:
    return sum(m[key] for m in per_seed) / len(per_seed)


def table(results: dict, noise_seeds) -> str:
    seed_cols = " | ".join(f"PSNR 1.. s={s}" for s in noise_seeds)
    lines = [(f"| sampler | steps | cfg | {seed_cols} | PSNR 1.. mean | PSNR 13..16 | moving PSNR | seam ratio "
              "| s/video |"), "|---|---|---|" + "---|" * (len(noise_seeds) + 5)]
    for (sampler, steps, cfg), per_seed in results.items():
        after = [m["generated"]["mean_after_start_psnr_db"] for m in per_seed]
        seam = sum(m["seam_ratio_after_start"]["generated"] for m in per_seed) / len(per_seed)
        lines.append(f"| {sampler} | {steps} | {cfg:g} | " + " | ".join(f"{x:.2f}" for x in after)
                     + f" | {sum(after) / len(after):.2f} | {_mean(per_seed, 'last4_psnr_db'):.2f}"
                     f" | {_mean(per_seed, 'moving_psnr_db'):.2f} | {seam:.3f} | {_mean(per_seed, 's_per_video'):.2f} |")
    return "\n".join(lines)


def best_setting(results: dict):
    return max(results, key=lambda k: sum(m["generated"]["mean_after_start_psnr_db"] for m in results[k]))


def write_new(path: Path, write) -> None:
    """``write(tmp)`` into a scratch file, then published as ``path`` the way the pack writes files
    (``kernels.format.write_bytes``: temporary name, no replacing a file that appeared meanwhile)."""
    import tempfile

    from wan_w4a4.kernels import format as fmt

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / f"scratch{path.suffix}"  # the suffix tells Pillow the format
        write(tmp)
        fmt.write_bytes(path, tmp.read_bytes())


def main(argv=None) -> int:
    a = parse_args(argv)
    if not runtime.start_cpu_script("mini_sampling", a.comfyui, a.threads):
        return 2
    from wan_w4a4.apps import mini_pictures as pictures
    from wan_w4a4.apps import mini_sample as sample
    from wan_w4a4.minimodel import data

    high, low, vae = sample.load_folder(a.dir)
    seeds = data.heldout_seeds(a.scenes)
    log_path = a.dir / "train_log.json"
    if log_path.is_file():
        logged = json.loads(log_path.read_text()).get("generation") or {}
        if logged.get("scene_seeds") and logged["scene_seeds"] != list(seeds):
            logger.warning("train_log.json's generation metric used scenes %s, this run %s", logged["scene_seeds"],
                           list(seeds))
    pictures.strip_rows(high, low, seeds[:1], steps=2, vae=vae)  # warm-up: first-call costs out of the timings
    results, all_rows = {}, {}
    for i, setting in enumerate(a.grid):
        per_seed = []
        for s in a.noise_seeds:
            m, rows = measure(high, low, vae, seeds, setting, s)
            per_seed.append(m)
            if s == a.noise_seeds[0]:
                all_rows[setting] = rows
            logger.info("[%d/%d] %s,%d,cfg %g, noise seeds %d..: PSNR after start %.2f dB, seam %.3f, %.2f s/video",
                        i + 1, len(a.grid), *setting, s, m["generated"]["mean_after_start_psnr_db"],
                        m["seam_ratio_after_start"]["generated"], m["s_per_video"])
        results[setting] = per_seed
    first = next(iter(results.values()))[0]
    print(f"\nMini model held-out generation by sampling setting: {a.scenes} held-out scenes (seeds "
          f"{seeds[0]}..{seeds[-1]}), experts {', '.join(sample.EMBEDDED_FILES.values())} and the "
          f"{first['pixel_space']} of {a.dir}, CPU, {a.threads} torch threads, ComfyUI {runtime.comfyui_tree(a.comfyui)}.")
    print(f"Reference (true latent decoded) {first['reference']['mean_after_start_psnr_db']:.2f} dB, still start "
          f"frame {first['still']['mean_after_start_psnr_db']:.2f} dB; seam ratio rendered "
          f"{first['seam_ratio_after_start']['truth']:.3f}, reference {first['seam_ratio_after_start']['reference']:.3f}."
          "\n")
    print(table(results, a.noise_seeds))
    best = best_setting(results)
    print(f"\nbest PSNR after the start frame (mean over noise-seed sets): {best[0]}, {best[1]} steps, cfg {best[2]:g}")
    if a.json is not None:
        payload = {f"{k[0]},{k[1]},{k[2]:g}": v for k, v in results.items()}
        write_new(a.json, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    if a.strips is not None:
        other = a.strips_setting or best
        if other not in all_rows:
            m, all_rows[other] = measure(high, low, vae, seeds, other, a.noise_seeds[0])
        if BASELINE not in all_rows:
            m, all_rows[BASELINE] = measure(high, low, vae, seeds, BASELINE, a.noise_seeds[0])
        rows = []
        for base, alt in list(zip(all_rows[BASELINE], all_rows[other]))[:a.strip_scenes]:
            rows.append((f"[{BASELINE[0]} {BASELINE[1]} steps, cfg {BASELINE[2]:g}] {base[0]}", base[1], base[2]))
            rows.append((f"[{other[0]} {other[1]} steps, cfg {other[2]:g}] {alt[0]}", alt[1], alt[2]))
        write_new(a.strips, lambda tmp: pictures.draw_strips(rows, tmp))
        print(f"strips: {a.strips} (each scene twice: {BASELINE}, then {other})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
