"""The report: the table of every configuration and memory mode with ratios to BF16, the comparisons
of W4A4 with BF16 and the references, the calibration timing, the kernel profile, and the markdown
section that is printed and appended to RESULTS.md. It reads only the JSON the children wrote, so an
old run's JSON renders again (--report-from); it reports numbers and ratios, it does not judge them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CFG, MODES, RESOLUTIONS, SAMPLER, SCHEDULER, SHIFT, arch_of, now_utc
from .profiling import KERNEL_FAMILIES


def _ratio(x, ref):
    if x is None or ref is None or not ref:
        return None
    return x / ref


def _fmt(x, ref=None, digits=2):
    if x is None:
        return "–"
    s = f"{x:.{digits}f}"
    r = _ratio(x, ref)
    return s if r is None else f"{s} ({r:.2f}×)"


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for cfg, res in results.items():
        if not res.get("modes"):
            rows.append({"config": cfg, "mode": "–", "note": res.get("skipped") or res.get("error") or "no result"})
            continue
        for mode, r in res["modes"].items():
            st = r["stages"]
            rows.append({"config": cfg, "mode": mode, "peak_alloc": r["peak_alloc_gib"],
                         "peak_reserved": r["peak_reserved_gib"], "used": r.get("device_used_max_gib"),
                         "step_high": st["high"]["step_s_median"],
                         "step_low": st["low"]["step_s_median"], "sampling": r["sampling_s"],
                         "compute": r["compute_s"], "rss": res["host_peak_rss_gib"],
                         "load": sum(v["s"] for v in res["load"].values()),
                         "resident": " + ".join(f"{x['model']} {x['loaded_gib']:.1f}" if x.get("loaded_gib") and
                                                 x["device"] != "cpu" else x["model"]
                                                 for x in st["low"]["resident_during"]) or "–",
                         "note": "; ".join(x for x in (r.get("warning", ""), _created_note(res),
                                                       res.get("error", "")) if x)})
    return rows


def _created_note(res: dict) -> str:
    where = {e: v.get("created_on", "?") for e, v in res.get("load", {}).items()}
    if all(w == "cpu" for w in where.values()):
        return ""
    return ("loader created " + ", ".join(f"{e} on {w}" for e, w in where.items())
            + " (ComfyUI puts a new model on the GPU when it has more free memory than the host)")


def table_md(results: dict) -> str:
    rows = summary_rows(results)
    ref = {r["mode"]: r for r in rows if r["config"] == "bf16" and "peak_alloc" in r}
    head = ("| config | memory mode | peak GPU allocated GiB (×BF16) | peak GPU reserved GiB (×BF16) | "
            "GPU used, driver GiB | high-noise step s (×) | low-noise step s (×) | sampling s, loads incl. (×) | "
            "model calls s (×) | host RSS peak GiB (×) | load both s | on GPU in low stage (GiB) | note |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if "peak_alloc" not in r:
            lines.append(f"| {r['config']} | – | – | – | – | – | – | – | – | – | – | – | {r['note']} |")
            continue
        b = ref.get(r["mode"], {})
        lines.append("| " + " | ".join([
            r["config"], r["mode"], _fmt(r["peak_alloc"], b.get("peak_alloc")),
            _fmt(r["peak_reserved"], b.get("peak_reserved")), _fmt(r["used"]), _fmt(r["step_high"], b.get("step_high"), 3),
            _fmt(r["step_low"], b.get("step_low"), 3), _fmt(r["sampling"], b.get("sampling"), 1),
            _fmt(r["compute"], b.get("compute"), 1), _fmt(r["rss"], b.get("rss")), f"{r['load']:.1f}",
            r["resident"], r["note"]]) + " |")
    return "\n".join(lines)


def _mode_row(results: dict, config: str, mode: str) -> dict | None:
    return next((r for r in summary_rows({config: results[config]}) if r["mode"] == mode and "peak_alloc" in r),
                None) if config in results else None


def _steps_ratio(a: dict, b: dict) -> str:
    parts = []
    for st in ("step_high", "step_low"):
        r = _ratio(a.get(st), b.get(st))
        parts.append("–" if r is None else f"{r:.3f}×")
    return " / ".join(parts)


def _gib_text(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _pct(r) -> str:
    return "–" if r is None else f"{r:.1%}"


# W4A4 against each reference configuration, one line per memory mode where both ran. The fields: w_gib /
# r_gib W4A4's / the reference's peak allocated GiB, mem W4A4's peak as a share of the reference's, steps
# W4A4's step times over the reference's; r_mem and r_steps the same for the reference against BF16.
REFERENCE_LINES = {
    "bf16_split": "like for like, against BF16 with the same cond/uncond split: {w_gib} / {r_gib} GiB = {mem}; "
                  "steps {steps}",
    "fp8_fast": "against ComfyUI's fp8_e4m3fn_fast: memory {mem}, steps {steps}",
    "fp8_fast_eval": "against fp8_e4m3fn_fast with the model in eval mode (its fp8 matmul on): memory {mem}, "
                     "steps {steps}; fp8_fast_eval vs BF16: memory {r_mem}, steps {r_steps}",
}


def comparisons_md(results: dict) -> str:
    """W4A4 against BF16 per memory mode, and the reference comparisons: the cond/uncond split on each
    side, ComfyUI's fp8, and the cost of a LoRA on every block Linear. Numbers and ratios only."""
    g, pct = _gib_text, _pct
    lines = []
    for mode in MODES:
        w, b = _mode_row(results, "w4a4", mode), _mode_row(results, "bf16", mode)
        if not (w and b):
            continue
        pr = _ratio(w["peak_alloc"], b["peak_alloc"])
        rr = _ratio(w["peak_reserved"], b["peak_reserved"])
        lines.append(f"- **{mode}**: W4A4 peak GPU allocated {g(w['peak_alloc'])} GiB = **{pct(pr)} of BF16**, "
                     f"reserved {pct(rr)}; step time high / low {_steps_ratio(w, b)} of BF16.")
        for config, text in REFERENCE_LINES.items():
            r = _mode_row(results, config, mode)
            if r:
                lines.append("  - " + text.format(
                    w_gib=g(w["peak_alloc"]), r_gib=g(r["peak_alloc"]), mem=pct(_ratio(w["peak_alloc"], r["peak_alloc"])),
                    steps=_steps_ratio(w, r), r_mem=pct(_ratio(r["peak_alloc"], b["peak_alloc"])),
                    r_steps=_steps_ratio(r, b)) + ".")
    for mode in MODES:
        for a, b, what in (("bf16_split", "bf16", "the cond/uncond split on BF16"),
                           ("w4a4", "w4a4_batched", "the cond/uncond split on W4A4 (split vs batched)")):
            ra, rb = _mode_row(results, a, mode), _mode_row(results, b, mode)
            if ra and rb:
                d = None if ra["peak_alloc"] is None else ra["peak_alloc"] - rb["peak_alloc"]
                lines.append(f"- {mode}, {what}: peak allocated {g(rb['peak_alloc'])} → {g(ra['peak_alloc'])} GiB "
                             f"({'–' if d is None else f'{d:+.2f}'}); steps {_steps_ratio(ra, rb)}.")
    for mode in MODES:
        line = _lora_line(results, mode)
        if line:
            lines.append(line)
    return ("Against BF16 and the references:\n\n" + "\n".join(lines) + "\n") if lines else ""


def _lora_line(results: dict, mode: str) -> str | None:
    """The LoRA configuration against W4A4 without it: the extra peak memory next to the LoRA's own
    BF16 size times the experts resident, the step-time ratio and how many layers took the LoRA."""
    lo, w = _mode_row(results, "w4a4_lora", mode), _mode_row(results, "w4a4", mode)
    if not (lo and w):
        return None
    info = results["w4a4_lora"].get("lora", {})
    per = info.get("bf16_gib_per_expert") or 0.0
    stages = results["w4a4_lora"]["modes"][mode]["stages"]
    folded = {st: (stages[st].get("lora_folded") or {}) for st in ("high", "low")}
    n_res = sum(1 for x in stages["low"]["resident_during"] if x.get("device") != "cpu"
                and (x.get("loaded_gib") or 0) > 0 and x["model"] in ("high", "low")) or 1
    # Exact bytes where the run recorded them (GiB to 3 decimals is +-1 MiB, the size of the question).
    lo_b = results["w4a4_lora"]["modes"][mode].get("peak_alloc_bytes")
    w_b = results["w4a4"]["modes"][mode].get("peak_alloc_bytes")
    per_b = info.get("bf16_bytes_per_expert")
    if None not in (lo_b, w_b, per_b):
        amount = (f"{(lo_b - w_b) / 2**20:+.1f} MiB; the LoRA is {per_b / 2**20:.1f} MiB in BF16 per expert, "
                  f"{n_res} expert(s) resident: {n_res * per_b / 2**20:.1f} MiB")
    else:
        extra = None if lo["peak_alloc"] is None else lo["peak_alloc"] - w["peak_alloc"]
        amount = (f"{'–' if extra is None else f'{extra:+.3f}'} GiB; the LoRA is {per:.3f} GiB in BF16 per "
                  f"expert, {n_res} expert(s) resident: {n_res * per:.3f} GiB")
    g = _gib_text
    return (f"- {mode}, rank-{info.get('rank')} LoRA on every block Linear: peak allocated "
            f"{g(w['peak_alloc'])} → {g(lo['peak_alloc'])} GiB ({amount}); steps {_steps_ratio(lo, w)} of "
            f"W4A4 without LoRA; layers folded at the first call, high / low: "
            f"{folded['high'].get('layers')} / {folded['low'].get('layers')} (ranks "
            f"{folded['high'].get('ranks')}).")


def _budget_md(c: dict) -> str:
    parts = ([f"GPU budget {c['gpu_budget_gib']:g} GiB"] if c.get("gpu_budget_gib") else []) + \
            ([f"process capped to {c['gpu_cap_gib']:g} GiB"] if c.get("gpu_cap_gib") else []) + \
            (["dynamic VRAM"] if c.get("dynamic_vram") else [])
    return f", {', '.join(parts)}" if parts else ""


def calib_md(c: dict) -> str:
    if not c:
        return ""
    if "calibrate_s" not in c:
        return f"Calibration: {c.get('skipped') or c.get('error') or 'no result'}\n"
    lines = [(f"Calibration ({c['items']} random items × {c['steps']} steps at {c['res']} × {c['frames']} frames, "
             f"first {c['blocks_calibrated']} of {c['blocks_total']} blocks, blocks_per_pass "
             f"{c['blocks_per_pass'] or 'all'}, token_fraction {c['token_fraction']}"
             f"{_budget_md(c)}): load both {c['load_s']:.1f} s, "
             f"calibrate {c['calibrate_s']:.1f} s, peak GPU allocated {_fmt(c['peak_alloc_gib'])} GiB, "
             f"reserved {_fmt(c['peak_reserved_gib'])} GiB, GPU used (driver) max {_fmt(c.get('device_used_max_gib'))} "
             f"GiB, host RSS peak {_fmt(c['host_peak_rss_gib'])} GiB."),
             "", ("| expert | layers | capture s per pass | quantize s per pass | s per layer | "
             "extrapolated to all blocks s |"), "|---|---|---|---|---|---|"]
    for e, d in c["experts"].items():
        lines.append(f"| {e} | {d['layers']} | {d['capture_s']} | {d['quantize_s']} | {d['quantize_s_per_layer']} | "
                     f"{d['extrapolated_40_blocks_s']} |")
    lines += ["", (f"Extrapolated calibration of both experts, all blocks: **{c['extrapolated_total_s'] / 60:.1f} min** "
              f"({c['extrapolation']}).")]
    return "\n".join(lines) + "\n"


def profile_md(results: dict) -> str:
    """GPU time of one profiled model call per configuration: kernel families side by side, top kernels."""
    prof = {c: r["profile"] for c, r in results.items() if isinstance(r.get("profile"), dict)
            and "families" in r["profile"]}
    if not prof:
        return ""
    any_p = next(iter(prof.values()))
    fams = [f for f, _ in KERNEL_FAMILIES] + ["other"]
    which = "first call" if any_p.get("call", 1) == 1 else f"call {any_p['call']}"
    lines = [(f"Profile of one model call ({any_p['mode']} mode, {which} of the {any_p['stage']} stage; "
             f"torch.profiler, CUDA kernels' self time; that call is not in the step times). Batch 2 = cond and "
             f"uncond in one call (a whole step), batch 1 = half a step (cond_batch split):"), "",
             "| kernel family | " + " | ".join(f"{c} ms (share)" for c in prof) + " |",
             "|---|" + "---|" * len(prof)]
    for f in fams:
        cells = [prof[c]["families"].get(f) for c in prof]
        if any(cells):
            lines.append(f"| {f} | " + " | ".join(f"{x['ms']:.1f} ({100 * x['share']:.1f} %)" if x else "–"
                                                  for x in cells) + " |")
    lines.append("| **all kernels** | " + " | ".join(f"**{prof[c]['gpu_ms']:.1f}**" for c in prof) + " |")
    lines.append("| call wall time | " + " | ".join(f"{1000 * prof[c]['wall_s']:.1f}" for c in prof) + " |")
    if any("gpu_busy_ms" in prof[c] for c in prof):  # runs before the busy time was recorded have none
        lines.append("| GPU busy (any stream) / first-to-last kernel | "
                     + " | ".join(f"{prof[c].get('gpu_busy_ms', '–')} / {prof[c].get('gpu_span_ms', '–')}"
                                  for c in prof) + " |")
    lines.append("| batch | " + " | ".join(str(prof[c]["batch"]) for c in prof) + " |")
    for c, p in prof.items():
        lines += ["", f"Top kernels, {c}:", "", "| kernel | family | calls | ms | share |", "|---|---|---|---|---|"]
        for k in p["top"][:10]:
            name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
            lines.append(f"| `{name}` | {k['family']} | {k['calls']} | {k['ms']:.1f} | {100 * k['share']:.1f} % |")
    for c, p in prof.items():
        if p.get("host_top"):
            lines += ["", f"Host functions of that call, {c} (cProfile, by own time; cProfile slows the host):", "",
                      "| function | calls | own ms | cumulative ms |", "|---|---|---|---|"]
            lines += [f"| `{r['function']}` | {r['calls']} | {r['own_ms']:.1f} | {r['cum_ms']:.1f} |"
                      for r in p["host_top"][:15]]
    return "\n".join(lines) + "\n"


def report_md(meta: dict, results: dict, calib: dict) -> str:
    args = argparse.Namespace(**meta["args"])
    env = next((r["env"] for r in list(results.values()) + [calib or {}] if isinstance(r, dict) and "env" in r), {})
    w, h = RESOLUTIONS[args.res]
    any_res = next((r for r in results.values() if "split" in r), {})
    gen = meta.get("generate", {})
    if args.configs:
        title = (f"{args.res} ({w}×{h}) × {args.frames} frames, {args.steps} steps "
                 f"({any_res.get('split', '?')} high + {args.steps - any_res.get('split', 0)} low)")
    else:
        title = "calibration timing"
    allocator = (f", CUDA allocator {env.get('allocator')} (PYTORCH_CUDA_ALLOC_CONF={env.get('alloc_conf')})"
                 if env.get("allocator") else "")
    lines = [(f"## {meta.get('finished') or now_utc()} — {env.get('gpu', '?')}, {title}"
             f"{'' if args.arch == 'real' else f' — arch {args.arch} (smoke test, not a measurement)'}"), "",
             (f"- GPU {env.get('gpu')} ({env.get('gpu_mem_gib')} GiB, driver {env.get('driver')}), torch {env.get('torch')} "
             f"(CUDA {env.get('cuda')}), Triton {env.get('triton')}, ComfyUI {env.get('comfyui')}, Python {env.get('python')}, "
             f"{env.get('cpus')} CPUs, {env.get('host_ram_gib')} GiB host RAM"
             f"{allocator}."),
             (f"- Model: {'Wan2.2-I2V-A14B shapes' if args.arch == 'real' else 'tiny Wan2.2-I2V-shaped model'} "
             f"({arch_of(args.arch)}), random weights. Experts from "
             f"**{meta['source_used']}** ({meta['source_note']}).")]
    if results:
        lines += [
             (f"- Graph: loader → ModelSamplingSD3(shift {SHIFT:g}) → KSamplerAdvanced × 2 split at t = 900, {SAMPLER}/{SCHEDULER}, "
             f"cfg {CFG} (cond + uncond), latent {any_res.get('latent')} = {any_res.get('tokens')} tokens, text context "
             f"[1, {args.text_tokens}, 4096], in-process; SDPA order `{any_res.get('attention', 'comfy')}` for "
             f"every configuration (`nodes/attention.py`: comfy = ComfyUI's own, auto = cuDNN first on Hopper)."),
             ("- Memory modes: **default** = ComfyUI's smart memory (the high-noise expert stays on the GPU when the "
             "low-noise one is loaded if ComfyUI thinks it fits); **one-expert** = ComfyUI's `--disable-smart-memory` "
             "behaviour (loading the low-noise expert unloads the high-noise one; models created on the CPU). "
             "The column 'on GPU in low stage' is what ComfyUI actually held during the low-noise steps."),
             ("- Peak GPU memory: `torch.cuda.max_memory_allocated/reserved` over the whole mode; the first mode of each "
             "configuration also covers loading (process start). Step time: median over the stage's steps of the "
             "model call(s) of one step (cond+uncond), cuda-synchronized, excluding the first model call of the "
             "process (warm-up, Triton compilation), the profiled call's step and each stage's first step (it "
             "brings the stage's expert to the GPU). Sampling: wall time of the two KSamplerAdvanced calls, "
             "including ComfyUI moving the weights to the GPU. Host RSS: `ru_maxrss` of the configuration's process "
             "(loading both experts included). GPU used, driver: max of total − free (`cuda.mem_get_info`, what "
             "nvidia-smi shows) sampled after each model call: CUDA context and allocator cache included."),
             ("- Allocator: cudaMallocAsync, as ComfyUI's main.py sets it (`cuda_malloc.py`); allocated bytes are "
              "what the tensors request." if env.get("allocator") == "cudaMallocAsync" else
              "- Allocator: PyTorch's native caching allocator (ComfyUI used as a library; its main.py would pick "
              "`cudaMallocAsync`). Its allocated bytes count a reused block it does not split (a remainder under "
              "1 MiB) whole, so differences of a few tens of MiB between runs are allocator noise; reserved and "
              "driver-level numbers differ between the two allocators."),
            *([("- Dynamic VRAM (comfy-aimdo) on, as ComfyUI 0.33's main.py sets it: the weights it streams live in "
               "its own virtual VRAM, outside PyTorch's allocator, so peak allocated/reserved leave them out and "
               "'GPU used, driver' is the column to compare (the ratios below read peak allocated).")]
              if env.get("dynamic_vram") else [])]
    lines.append("")
    if gen:
        lines.append(f"- Files: {json.dumps({k: v for k, v in gen.items() if k != 'device'})}")
        lines.append("")
    if results:
        lines += [table_md(results), ""]
        t = comparisons_md(results)
        if t:
            lines += [t, ""]
        t = profile_md(results)
        if t:
            lines += [t, ""]
    if calib:
        lines += [calib_md(calib), ""]
    if meta.get("child_s"):
        whole = f"; whole run {meta['wall_s']} s" if meta.get("wall_s") is not None else ""
        lines.append(f"Wall time per child process, s: {json.dumps(meta['child_s'])}{whole}.")
        lines.append("")
    if meta.get("commands"):  # a report merged from several runs (--report-from)
        lines.append("Commands (one GPU call each): " + "; ".join(f"`{c}`" for c in meta["commands"])
                     + f"; raw data: {args.json}.")
    else:
        lines.append(f"Command: `{' '.join(meta['argv'])}`; raw data: {args.json or '(no --json)'}.")
    return "\n".join(lines) + "\n"


def append_results(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# End-to-end benchmark results (benchmarks/bench_wan_e2e.py)\n\n")
    with open(path, "a") as f:
        f.write("\n" + text)

