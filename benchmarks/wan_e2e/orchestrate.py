"""The parent process: picks where the experts come from, runs one child process per step (making the
files, each configuration, calibration timing) under the time budget, collects their JSON, writes the
report, and re-renders earlier runs' JSON (--report-from). Children are this same script with the
hidden --_child option, so that each configuration's peak GPU memory and host RSS are its own."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .calib import run_calibration
from .child import run_config
from .cli import DESCRIPTION, parse_args
from .common import (
    CONFIGS,
    GIB,
    REPO,
    arch_of,
    base_dir,
    file_names,
    is_w4a4,
    now_utc,
    write_json,
)
from .report import append_results, report_md, table_md
from .weights import bytes_bf16_file, bytes_w4a4_file, generate_files

log = logging.getLogger(__name__)

# The entry point the children run: the same command line, with --_child.
SCRIPT = Path(__file__).resolve().parents[1] / "bench_wan_e2e.py"


def fs_type(path: Path) -> str:
    """Filesystem type of ``path`` from /proc/mounts (tmpfs means the files live in RAM)."""
    try:
        best, kind = "", "?"
        p = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and (p == parts[1] or p.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
        return kind
    except OSError:
        return "?"


def child_cmd(args, kind: str, out_json: Path, config: str | None = None) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--_child", kind, "--_child-out", str(out_json),
           "--arch", args.arch, "--res", args.res, "--frames", str(args.frames), "--steps", str(args.steps),
           "--memory", ",".join(args.memory), "--workdir", str(args.workdir), "--source", args.source,
           "--seed", str(args.seed), "--text-tokens", str(args.text_tokens),
           "--calib-items", str(args.calib_items), "--calib-frames", str(args.calib_frames),
           "--calib-res", args.calib_res, "--calib-steps", str(args.calib_steps),
           "--calib-blocks", str(args.calib_blocks), "--calib-token-fraction", str(args.calib_token_fraction),
           "--calib-full-blocks-per-pass", str(args.calib_full_blocks_per_pass),
           "--calib-source", args.calib_source, "--log-level", args.log_level, "--attention", args.attention]
    if args.calib_blocks_per_pass:
        cmd += ["--calib-blocks-per-pass", str(args.calib_blocks_per_pass)]
    if args.calib_gpu_budget:
        cmd += ["--calib-gpu-budget", str(args.calib_gpu_budget)]
    if args.calib_gpu_cap:
        cmd += ["--calib-gpu-cap", str(args.calib_gpu_cap)]
    if args.comfyui:
        cmd += ["--comfyui", str(args.comfyui)]
    if args.cpu:
        cmd.append("--cpu")
    if args.profile:
        cmd += ["--profile", "--profile-call", str(args.profile_call)]
    if args.dynamic_vram:
        cmd.append("--dynamic-vram")
    if config:
        cmd += ["--config", config]
    return cmd


def run_child(args, kind: str, config: str | None, deadline: float | None) -> dict:
    out_json = Path(args.workdir) / f"child_{kind}_{config or 'all'}.json"
    out_json.unlink(missing_ok=True)
    timeout = None
    if deadline is not None:
        timeout = deadline - time.monotonic()
        if timeout < args.min_child_s:
            return {"skipped": f"budget: {max(0, timeout):.0f} s left, {args.min_child_s} s needed"}
    cmd = child_cmd(args, kind, out_json, config)
    log.info("== %s%s (timeout %s)", kind, f" {config}" if config else "",
             "none" if timeout is None else f"{timeout:.0f} s")
    t0 = time.monotonic()
    try:
        rc = subprocess.run(cmd, check=False, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    except subprocess.TimeoutExpired:
        res = json.loads(out_json.read_text()) if out_json.is_file() else {}
        res["error"] = f"stopped at the budget after {time.monotonic() - t0:.0f} s"
        return res
    if out_json.is_file():
        res = json.loads(out_json.read_text())
        if rc != 0:
            res.setdefault("error", f"exit code {rc}")
        return res
    return {"error": f"exit code {rc}, no result (see the log above)"}


def choose_source(args) -> tuple[str, str]:
    if args.source != "auto":
        return args.source, "chosen with --source"
    need = bytes_bf16_file(arch_of(args.arch)) + bytes_w4a4_file(arch_of(args.arch)) + 2 * GIB
    path = Path(args.workdir)
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    existing = base_dir(args) / "models" / "diffusion_models" / file_names(args)["bf16"]
    if existing.exists():
        free += existing.stat().st_size
    kind = fs_type(path)
    if kind == "tmpfs" and args.arch == "real":
        return "memory", f"{path} is tmpfs (files would take host RAM)"
    if free >= need:
        return "file", f"{free / GIB:.0f} GiB free in {path} ({kind}), {need / GIB:.1f} GiB needed"
    return "memory", f"only {free / GIB:.0f} GiB free in {path} ({kind}), {need / GIB:.1f} GiB needed for the files"


def child_main(args) -> int:
    out = {}
    try:
        if args._child == "gen":
            out = generate_files(args, args._need_bf16, args._need_w4a4, args._need_lora, args._need_fp8)
        elif args._child == "run":
            run_config(args, out)
        else:
            out = run_calibration(args)
        return 0
    except Exception as e:  # noqa: BLE001 - reported to the parent, which goes on with the next child
        import traceback
        traceback.print_exc()
        out = {**out, "error": f"{type(e).__name__}: {e}"}
        return 1
    finally:
        write_json(args._child_out, out)


def main(argv=None, description: str = DESCRIPTION) -> int:
    args = parse_args(argv, description)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if args._child:
        from wan_w4a4.apps import runtime
        return runtime.finish(child_main(args))
    if args.report_from:
        return report_from(args)

    missing = [m for m in ("torchsde", "av", "safetensors", "einops") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench_wan_e2e: ComfyUI needs the Python package(s) {', '.join(missing)}, not installed here "
              f"(on a machine without internet, carry their wheels and pip install them first)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    deadline = None if args.budget_s is None else t0 + args.budget_s - 10.0  # 10 s to write the report
    args.workdir.mkdir(parents=True, exist_ok=True)
    from wan_w4a4.apps import runtime
    args.comfyui = args.comfyui or runtime.find_comfyui()
    if args.comfyui is None:
        print(f"bench_wan_e2e: {runtime.not_found_message()}", file=sys.stderr)
        return 2
    source, why = choose_source(args)
    args.source = source
    note = {"file": f"one generated BF16 safetensors file loaded for both experts by UNETLoader; {why}",
            "memory": f"state dicts built in host memory per expert and loaded with "
                      f"comfy.sd.load_diffusion_model_state_dict (no BF16 file); {why}"}[source]
    meta = {"argv": [Path(sys.executable).name, *sys.argv], "source_used": source, "source_note": note,
            "workdir": str(args.workdir), "started": now_utc(), "configs": args.configs,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k in ("arch", "res", "frames", "steps", "text_tokens", "json", "configs", "memory", "seed")}}
    log.info("experts from: %s (%s)", source, note)

    results, calib = run_children(args, meta, deadline)
    meta["finished"] = now_utc()
    meta["wall_s"] = round(time.monotonic() - t0, 1)

    text = report_md(meta, results, calib)
    print("\n" + text)
    if args.results_md and args.results_md != "none":
        append_results(Path(args.results_md), text)
        log.info("appended to %s", args.results_md)
    _checkpoint(args, meta, results, calib)
    failed = [c for c, r in results.items() if not r.get("modes") or "error" in r]
    return 1 if failed or (args.calibrate and "calibrate_s" not in calib and "skipped" not in calib) else 0


def run_children(args, meta: dict, deadline: float | None) -> tuple[dict, dict]:
    """The generation child (when files are needed), one child per configuration, then calibration
    timing; fills ``meta`` with what generation did and each child's wall time, and writes the JSON
    after each configuration so that a run stopped later keeps what finished."""
    calib_bf16 = args.calibrate and args.calib_source == "bf16"
    need_bf16 = args.source == "file" and (any(not is_w4a4(c) and not CONFIGS[c].get("file") for c in args.configs)
                                           or calib_bf16)
    # whatever --source says, an fp8_scaled source is a file
    need_fp8 = (args.calibrate and args.calib_source == "fp8_scaled") or any(
        CONFIGS[c].get("file") == "fp8_scaled" for c in args.configs)
    need_w4a4 = any(is_w4a4(c) for c in args.configs)
    need_lora = any(CONFIGS[c].get("lora_rank") for c in args.configs)
    results, calib = {}, {}
    if need_bf16 or need_fp8 or need_w4a4 or need_lora:
        tc = time.monotonic()
        gen = run_child_gen(args, need_bf16, need_w4a4, need_lora, deadline, need_fp8)
        gen["child_s"] = round(time.monotonic() - tc, 1)
        meta["generate"] = gen
        if "error" in gen or "skipped" in gen:
            log.error("generating the experts failed: %s", gen.get("error") or gen.get("skipped"))
            for c in args.configs:
                results[c] = {"error": "no model files: " + (gen.get("error") or gen.get("skipped"))}
            args.configs = []
            args.calibrate = args.calibrate and not (need_bf16 or need_fp8)
    meta["child_s"] = {}
    for c in args.configs:
        tc = time.monotonic()
        results[c] = run_child(args, "run", c, deadline)
        meta["child_s"][c] = round(time.monotonic() - tc, 1)
        _checkpoint(args, meta, results, calib)
    if args.calibrate:
        tc = time.monotonic()
        calib = run_child(args, "calibrate", None, deadline)
        meta["child_s"]["calibrate"] = round(time.monotonic() - tc, 1)
    return results, calib


def report_from(args) -> int:
    """Re-render the markdown of one or more --json files (merged) and append it."""
    meta, results, calib, commands, child_s = None, {}, {}, [], {}
    for path in args.report_from:
        data = json.loads(Path(path).read_text())
        if meta is None or (not results and data.get("results")):
            meta = data["meta"]
        if data.get("meta", {}).get("argv"):
            commands.append(" ".join(data["meta"]["argv"]))
        child_s.update(data.get("meta", {}).get("child_s") or {})
        results.update(data.get("results") or {})
        calib = data.get("calibration") or calib
    if meta is None or "args" not in meta:
        print(f"bench_wan_e2e: {args.report_from[0]} has no meta.args (not written by this version of the script)",
              file=sys.stderr)
        return 2
    if meta["args"].get("configs") is not None:
        meta["args"]["configs"] = list(results)
    meta["args"]["json"] = ", ".join(str(p) for p in args.report_from)
    if len(set(commands)) > 1:
        meta["commands"] = commands
        meta["child_s"] = child_s
        meta.pop("wall_s", None)  # one run's; the merged runs' children are listed instead
    text = report_md(meta, results, calib)
    print(text)
    md = args.results_md or ("none" if meta["args"].get("arch") == "tiny" else str(REPO / "benchmarks" / "RESULTS.md"))
    if md != "none":
        append_results(Path(md), text)
        log.info("appended to %s", md)
    return 0


def run_child_gen(args, need_bf16: bool, need_w4a4: bool, need_lora: bool, deadline, need_fp8: bool = False) -> dict:
    saved = (args._need_bf16, args._need_w4a4, args._need_lora)
    args._need_bf16, args._need_w4a4, args._need_lora = need_bf16, need_w4a4, need_lora
    try:
        out_json = Path(args.workdir) / "child_gen.json"
        out_json.unlink(missing_ok=True)
        cmd = child_cmd(args, "gen", out_json)
        if need_bf16:
            cmd.append("--_need-bf16")
        if need_w4a4:
            cmd.append("--_need-w4a4")
        if need_lora:
            cmd.append("--_need-lora")
        if need_fp8:
            cmd.append("--_need-fp8")
        timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
        log.info("== generating the experts (BF16 file: %s, fp8_scaled file: %s, W4A4 checkpoint: %s)",
                 need_bf16, need_fp8, need_w4a4)
        try:
            rc = subprocess.run(cmd, check=False, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            return {"error": "generation timed out (budget)"}
        res = json.loads(out_json.read_text()) if out_json.is_file() else {}
        if rc != 0:
            res.setdefault("error", f"exit code {rc}")
        return res
    finally:
        args._need_bf16, args._need_w4a4, args._need_lora = saved


def _checkpoint(args, meta, results, calib) -> None:
    if args.json:
        write_json(Path(args.json), {"meta": meta, "results": results, "calibration": calib,
                                     "table_md": table_md(results) if results else ""})


if __name__ == "__main__":
    sys.exit(main())
