"""Fidelity of the W4A4 configurations on the trained mini Wan2.2-I2V model: a script, not a test.

    python benchmarks/bench_fidelity.py --quick                 # CPU, a few minutes
    python benchmarks/bench_fidelity.py --k 16 --steps 20       # GPU-sized run (ComfyUI on CUDA if present)

What it does:

1. loads the two trained experts (``minimodel/``) through ComfyUI's UNETLoader;
2. calibrates them ONCE with the full method at ``--max-bins`` timestep bins per expert
   (bin_spacing "steps", cfg 1) on procedural scenes from the *training* seed range (seeds
   ``--item-seed`` ...); the held-out scenes (seeds 3e9 + i) are never seen by calibration;
3. builds every configuration from it (``minimodel/fidelity.py``, ``variant_states``):
   RTN W4A4; SVDQuant (RTN residual, c = 1); SVDQuant + GPTQ (c = 1); + global clip; + per-expert clip;
   + per-expert per-bin clip at each of ``--bins`` bin counts (4 = the pack's default). The clip ratios
   of each policy are chosen by ``calibration.report.choose_clips`` from the calibration's own error
   tables (pooled by addition over merged bins), so every row shares the same smoothing, low-rank
   branch and GPTQ residual and differs only in what its name says;
4. samples K held-out (start frame, caption) pairs with fixed noise seeds through the standard two-expert
   graph (WanImageToVideo -> ModelSamplingSD3 -> 2 x KSamplerAdvanced, split at t = 900) in BF16 and in
   each configuration, and reports, against BF16: PSNR / SSIM of the videos decoded by the mini model's
   decoder (pixel space: the learned decoder shipped in ``minimodel/``, else the linear VAE; named in the
   JSON's ``setup.pixel_space``), latent relative error (latent space), the velocity SQNR per call on the BF16 trajectory's inputs
   (teacher-forced replay: the W4A4 model is run a second time on the BF16 input of the same call)
   averaged per bin of the default 4-bin edges, and W4A4 bytes / BF16 bytes of the quantized Linears;
5. writes ``fidelity_<tag>.md`` / ``.json`` and two figures: ``activation_range_<tag>.png``
   (max |x| per block Linear vs timestep, both experts, from the BF16 runs: the paper's Figure 1)
   and ``clip_ratios_<tag>.png`` (the chosen clip ratios of the default configuration).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from wan_w4a4.apps import runtime  # imports neither comfy nor torch

HERE = Path(__file__).resolve().parent
EXPERTS = ("high", "low")
# setup.pixel_space (decoder.describe) -> what the videos compared by PSNR / SSIM are
PIXEL_SPACE_WORDS = {"linear VAE": "linear VAE (one picture per latent frame)",
                     "learned decoder": "learned decoder shipped in minimodel/ (one picture per latent frame: pixel frame 4k)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=8, help="held-out pairs (default 8)")
    p.add_argument("--steps", type=int, default=16, help="sampling steps of the compared videos (default 16)")
    p.add_argument("--calib-items", type=int, default=4, help="calibration items (default 4)")
    p.add_argument("--calib-steps", type=int, default=16, help="sampling steps during calibration (default 16: "
                   "8 per expert, one per bin at --max-bins 8)")
    p.add_argument("--item-seed", type=int, default=0, help="first training-range scene seed for calibration")
    p.add_argument("--seed", type=int, default=0, help="noise seed of held-out pair 0 (pair i: seed + i)")
    p.add_argument("--max-bins", type=int, default=8, help="bins of the one calibration (default 8)")
    p.add_argument("--bins", default="1,2,4,8", help="bin counts of the full method (divisors of --max-bins)")
    p.add_argument("--default-bins", type=int, default=4, help="the full method's bin count (default 4)")
    p.add_argument("--rows-per-bin", type=int, default=1024)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="CPU budget: K=2, 8 sampling steps, 2 calibration "
                   "items, 256 rows per bin")
    p.add_argument("--tag", default=None, help="result file tag (default: cpu_quick / <device>_k<K>)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see apps/demo.py)")
    runtime.add_arguments(p, device=False)  # --comfyui; ComfyUI picks the device
    a = p.parse_args(argv)
    if a.quick:
        a.k, a.steps, a.calib_items, a.rows_per_bin = 2, 8, 2, 256
    return a


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.perf_counter()
    import torch
    torch.set_num_threads(max(1, a.threads))
    try:
        runtime.init_comfyui(a.comfyui)
    except runtime.ComfyUINotFound as e:
        print(f"bench_fidelity: {e}", file=sys.stderr)
        return 2
    import comfy.model_management as mm
    from tqdm import tqdm
    from wan_w4a4.apps import mini_sample as sample
    from wan_w4a4.apps.calibrate import minimodel_items
    from wan_w4a4.calibration import CalibrationConfig, calibrate
    from wan_w4a4.kernels import format as fmt
    from wan_w4a4.minimodel import data, fidelity
    from wan_w4a4.minimodel import decoder as mini_decoder
    from wan_w4a4.nodes.apply import apply_w4a4_state

    device = mm.get_torch_device()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    tag = a.tag or ("cpu_quick" if a.quick else f"{device.type}_k{a.k}")
    a.out.mkdir(parents=True, exist_ok=True)
    outputs = {k: a.out / f"{k}_{tag}.{ext}" for k, ext in
               (("fidelity", "md"), ("fidelity_json", "json"), ("activation_range", "png"), ("clip_ratios", "png"))}
    outputs["fidelity_json"] = a.out / f"fidelity_{tag}.json"
    if not a.overwrite and any(p.exists() for p in outputs.values()):
        print(f"bench_fidelity: refusing to overwrite {[str(p) for p in outputs.values() if p.exists()]} "
              "(--overwrite or --tag)", file=sys.stderr)
        return 1
    bin_counts = [int(b) for b in a.bins.split(",") if b.strip()]

    paths = sample.embedded_checkpoints()
    models = {e: sample.load_expert(paths[e]) for e in EXPERTS}

    # 1. one calibration of the full method at max_bins
    items = minimodel_items(a.calib_items, seed=a.item_seed)
    heldout = data.heldout_seeds(a.k)
    assert not {it.seed for it in items} & set(heldout)
    work = Path(tempfile.mkdtemp(prefix="bench_fidelity_"))
    config = CalibrationConfig(steps=a.calib_steps, cfg=1.0, bins=a.max_bins, bin_spacing="steps", rank=a.rank,
                               rows_per_bin=a.rows_per_bin, out_dir=str(work), name="mini")
    print(f"calibrating: {a.calib_items} items, {a.calib_steps} steps, {a.max_bins} bins per expert")
    t_cal = time.perf_counter()
    result = calibrate(models["high"], models["low"], items, config)
    t_cal = time.perf_counter() - t_cal
    states = {e: fmt.load_state(getattr(result, e)) for e in EXPERTS}
    variants = fidelity.variant_states(models, states, result.data, bin_counts, a.default_bins)

    # reporting bins: the default bin count's edges (placed by the calibration's own timesteps)
    report_edges = {e: fidelity.coarse_edges(states[e][1].bin_edges, a.default_bins) for e in EXPERTS}

    def report_bin(e, t):
        ed = report_edges[e]
        for i in range(len(ed) - 1):
            if t >= ed[i + 1]:
                return i
        return len(ed) - 2

    # 2. BF16 references (with the activation-range capture)
    vae = mini_decoder.embedded_vae()
    linears = fidelity.block_linears(models["high"])
    ranges = {e: {} for e in EXPERTS}
    refs = []
    for i, s in enumerate(tqdm(heldout, desc="BF16", unit="pair")):
        scene = data.sample_scene(s)
        cap, video = data.caption(scene), data.render([scene])[0]
        rec = {e: fidelity.CallRecorder(ranges=ranges[e], linears=linears) for e in EXPERTS}
        z = sample.generate(rec["high"].attach(models["high"]), rec["low"].attach(models["low"]), cap, video[0],
                            steps=a.steps, seed=a.seed + i)
        refs.append({"seed": s, "caption": cap, "frame": video[0], "z": z, "rgb": vae.latent_to_rgb(z)[0],
                     "calls": {e: rec[e].calls for e in EXPERTS}})

    # 3. every W4A4 configuration
    rows = []
    for v in variants:
        # the previous variant's patched clones are still loaded (their object patches live on the shared
        # BF16 modules until ComfyUI unloads them), and apply_w4a4_state refuses a model that has W4A4 layers
        mm.unload_all_models()
        q = {e: apply_w4a4_state(models[e], v.layers[e], v.meta[e], source=f"variant {v.key}") for e in EXPERTS}
        per_pair, sq_bins = [], {f"{e}{b}": [] for e in EXPERTS for b in range(a.default_bins)}
        t_v = time.perf_counter()
        for i, ref in enumerate(tqdm(refs, desc=v.key, unit="pair")):
            rq = {e: fidelity.CallRecorder(reference=ref["calls"][e]) for e in EXPERTS}
            z = sample.generate(rq["high"].attach(q["high"]), rq["low"].attach(q["low"]), ref["caption"],
                                ref["frame"], steps=a.steps, seed=a.seed + i)
            rgb = vae.latent_to_rgb(z)[0]
            per_pair.append({"seed": ref["seed"], "psnr_db": fidelity.psnr(ref["rgb"], rgb),
                             "ssim": fidelity.ssim(ref["rgb"], rgb),
                             "latent_rel_err": fidelity.rel_err(vae.from_raw(ref["z"]), vae.from_raw(z))})
            for e in EXPERTS:
                for c in rq[e].calls:
                    sq_bins[f"{e}{report_bin(e, c.t)}"].append(c.sqnr)
        wb = sum(fidelity.w4a4_bytes(v.layers[e]) for e in EXPERTS)
        bb = sum(fidelity.bf16_bytes(v.layers[e]) for e in EXPERTS)
        row = {"key": v.key, "label": v.label,
               "psnr_db": _mean([p["psnr_db"] for p in per_pair]), "ssim": _mean([p["ssim"] for p in per_pair]),
               "latent_rel_err": _mean([p["latent_rel_err"] for p in per_pair]),
               "velocity_sqnr_db": {k: _mean(x) for k, x in sq_bins.items()},
               "velocity_sqnr_db_all": _mean([x for xs in sq_bins.values() for x in xs]),
               "w4a4_bytes": wb, "bf16_bytes": bb, "bytes_ratio": wb / bb,
               "bins": v.meta["high"].num_bins, "clip_policy": v.meta["high"].clip_policy,
               "pairs": per_pair, "seconds": round(time.perf_counter() - t_v, 2)}
        if v.key == f"full_{a.default_bins}bins":
            row["clips"] = {e: {n: p.clip.tolist() for n, p in v.layers[e].items()} for e in EXPERTS}
        rows.append(row)
        print(f"{v.key:16} PSNR {row['psnr_db']:6.2f} dB  SSIM {row['ssim']:.4f}  latent rel {row['latent_rel_err']:.4f}"
              f"  v-SQNR {row['velocity_sqnr_db_all']:6.2f} dB")

    # 4. outputs
    env = {"machine": dev_name, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "comfyui": runtime.comfyui_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    setup = {"k": a.k, "heldout_seeds": heldout, "noise_seeds": [a.seed + i for i in range(a.k)],
             "steps": a.steps, "cfg": 1.0, "shift": sample.SHIFT, "resolution": "17 frames x 128 x 128 px "
             "(latent 16 x 5 x 16 x 16)", "calib_items": a.calib_items, "calib_item_seeds": [it.seed for it in items],
             "calib_steps": a.calib_steps, "max_bins": a.max_bins, "rows_per_bin": a.rows_per_bin, "rank": a.rank,
             "report_bin_edges": {e: list(report_edges[e]) for e in EXPERTS},
             "calibration_s": round(t_cal, 1), "total_s": round(time.perf_counter() - t0, 1),
             "pixel_space": mini_decoder.describe(vae)}
    doc = {"what": "W4A4 fidelity vs BF16 on the trained mini Wan2.2-I2V model (benchmarks/bench_fidelity.py)",
           "tag": tag, "command": "python benchmarks/bench_fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "environment": env, "setup": setup, "rows": rows,
           "calibration_report": {e: {k: result.data["experts"][e].get(k) for k in
                                      ("bin_edges", "timesteps", "sqnr_rtn_db_pooled", "sqnr_after_db_pooled")}
                                  for e in EXPERTS}}
    for e in EXPERTS:  # the pipeline keeps the RTN residual where GPTQ does not beat it on the fit rows
        doc["calibration_report"][e]["gptq_layers"] = sum(
            x["residual"] == "gptq" for x in result.data["experts"][e]["layers"])
        doc["calibration_report"][e]["layers"] = len(result.data["experts"][e]["layers"])
    md = markdown(doc, a.default_bins)
    fidelity.draw_activation_ranges({**ranges["high"], **{n: ranges["high"].get(n, []) + ranges["low"].get(n, [])
                                                          for n in ranges["low"]}}, outputs["activation_range"])
    full = next(r for r in rows if r["key"] == f"full_{a.default_bins}bins")
    grid = result.data["config"]["clip_grid"]
    fidelity.draw_clip_heatmap(full["clips"], report_edges, outputs["clip_ratios"], grid=(min(grid), max(grid)))
    setup["total_s"] = round(time.perf_counter() - t0, 1)
    tmp = outputs["fidelity_json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(outputs["fidelity_json"])
    outputs["fidelity"].write_text(markdown(doc, a.default_bins))
    print(md)
    print("wrote " + ", ".join(str(p) for p in outputs.values()))
    return 0


def markdown(doc: dict, default_bins: int) -> str:
    s, env = doc["setup"], doc["environment"]
    cols = [f"{e[0].upper()}{b}" for e in EXPERTS for b in range(default_bins)]
    cr = doc["calibration_report"]
    # the layer count comes from the calibration report: the shipped experts have grown (4, then 6 blocks)
    counts = [cr[e].get("layers") for e in EXPERTS]
    n_linears = sum(counts) if None not in counts else "?"
    lines = [
        "# W4A4 fidelity on the mini Wan2.2-I2V model",
        "",
        (f"Measured {env['date']} on {env['machine']} ({env['device']}, {env['threads']} torch thread(s), "
        f"torch {env['torch']}, ComfyUI {env['comfyui']}). K = {s['k']} held-out pairs (scene seeds "
        f"{s['heldout_seeds'][0]}..{s['heldout_seeds'][-1]}, noise seeds {s['noise_seeds'][0]}..{s['noise_seeds'][-1]}), "
        f"{s['steps']} euler steps (shift 8, cfg 1, expert switch at t = 900), {s['resolution']}. "
        f"One calibration: {s['calib_items']} training-range scenes (seeds {s['calib_item_seeds']}), "
        f"{s['calib_steps']} steps, {s['max_bins']} bins per expert, {s['rows_per_bin']} rows per bin, rank "
        f"{s['rank']} ({s['calibration_s']} s); total {s['total_s']} s. Command: `{doc.get('command', '?')}`."),
        "",
        "All metrics are against the BF16 model on the same pairs and seeds. PSNR / SSIM: videos decoded by the "
        # results written before setup.pixel_space existed were all decoded by the linear VAE
        f"{PIXEL_SPACE_WORDS[s.get('pixel_space', 'linear VAE')]}. Latent rel.: ||z_q - z|| / ||z||. "
        "Velocity SQNR: per call, the "
        "W4A4 model on the BF16 trajectory's input of that call, vs the BF16 velocity, averaged over calls and "
        f"pairs in each bin of the default {default_bins}-bin edges (H = high-noise expert, L = low-noise; bin 0 "
        "= highest t): " + "; ".join(f"{e}: " + ", ".join(f"{x:.0f}" for x in s["report_bin_edges"][e])
                                      for e in EXPERTS) + f". Bytes: the {n_linears} quantized Linears of both experts.",
        "",
        "| configuration | bins | PSNR (dB) | SSIM | latent rel. | " + " | ".join(f"v-SQNR {c}" for c in cols)
        + " | v-SQNR all | W4A4/BF16 bytes |",
        "|" + "---|" * (7 + len(cols)),
    ]
    for r in doc["rows"]:
        v = r["velocity_sqnr_db"]
        lines.append(f"| {r['label']} | {r['bins']} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['latent_rel_err']:.4f} | "
                     + " | ".join(f"{v[f'{e}{b}']:.2f}" for e in EXPERTS for b in range(default_bins))
                     + f" | {r['velocity_sqnr_db_all']:.2f} | {r['bytes_ratio']:.3f} |")
    lines += ["", ("Layer-level (calibration report, held-out rows, pooled over layers): RTN W4A4 "
              f"{cr['high']['sqnr_rtn_db_pooled']:.2f} / {cr['low']['sqnr_rtn_db_pooled']:.2f} dB -> full method "
              f"{cr['high']['sqnr_after_db_pooled']:.2f} / {cr['low']['sqnr_after_db_pooled']:.2f} dB (high / low expert). "
              f"GPTQ residual kept in {cr['high'].get('gptq_layers', '?')} / {cr['low'].get('gptq_layers', '?')} "
              f"of the {cr['high'].get('layers', '?')} + {cr['low'].get('layers', '?')} layers (elsewhere RTN fit the calibration rows better; the pipeline keeps the better)."),
              "",
              (f"Figures: `activation_range_{doc['tag']}.png` (max |x| per block Linear vs timestep, both experts, "
              f"BF16 runs of the K pairs), `clip_ratios_{doc['tag']}.png` (clip ratios of the default configuration)."),
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
