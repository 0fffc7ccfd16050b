"""Smoke test of benchmarks/bench_wan_e2e.py (code in benchmarks/wan_e2e/): the whole script (generation
child, one child per configuration, report) on the tiny Wan arch, on the CPU, through a real ComfyUI.

It checks the plumbing the GPU run relies on - files made and reused, both experts through the real
two-expert graph, one model call per step with cond+uncond batched, the report's table and JSON -
not any number (CPU timings of a tiny model mean nothing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wan_w4a4.apps import runtime

SCRIPT = runtime.REPO_ROOT / "benchmarks" / "bench_wan_e2e.py"
STEPS = 2  # shift 8: timesteps 1000 | 889 -> one high-noise step, one low-noise step


def run_bench(comfyui: Path, workdir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--arch", "tiny", "--cpu", "--workdir", str(workdir),
           "--comfyui", str(comfyui), "--steps", str(STEPS), "--text-tokens", "16", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.comfyui
@pytest.mark.slow
def test_bench_e2e_tiny_cpu(comfyui, tmp_path, monkeypatch):
    """The one subprocess run of the script (each child imports ComfyUI, the slow part): every kind of
    configuration - plain BF16 and W4A4, the LoRA configuration (a generated rank-64 LoRA through
    LoraLoaderModelOnly, folded into every W4A4 layer), the cond/uncond-split reference on BF16 and the
    eval-mode fp8 reference - in both memory modes, then a second run that reuses the files."""
    out_json, md = tmp_path / "out.json", tmp_path / "RESULTS.md"
    monkeypatch.setenv("WAN_W4A4_BLOCK_GRAPHS", "1")  # the block graphs' checks run, without dynamic VRAM
    p = run_bench(comfyui, tmp_path / "work", "--config", "bf16,w4a4,w4a4_lora,bf16_split,fp8_fast_eval",
                  "--memory", "default,one-expert", "--profile", "--json", str(out_json), "--results-md", str(md))
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]

    data = json.loads(out_json.read_text())
    gen = data["meta"]["generate"]
    assert gen["bf16_generated"] and gen["w4a4_generated"] and gen["w4a4_layers"] == 20  # 2 blocks x 10
    assert Path(gen["bf16_file"]).is_file() and Path(gen["w4a4_file"]).is_file()
    assert gen["lora_generated"] and Path(gen["lora_file"]).is_file()
    assert data["meta"]["source_used"] == "file"
    for cfg in ("bf16", "w4a4"):
        res = data["results"][cfg]
        assert "error" not in res, res.get("error")
        assert res["split"] == 1 and res["latent"] == [1, 16, 2, 8, 8]
        for mode in ("default", "one-expert"):
            r = res["modes"][mode]
            assert r["output_finite"]
            for stage in ("high", "low"):
                steps = r["stages"][stage]["steps"]
                assert len(steps) == 1, steps  # one step per expert
                assert steps[0]["batches"] == [2]  # cfg > 1: cond and uncond in one batch
                assert steps[0]["s"] > 0
            assert r["stages"]["high"]["steps"][0]["t"] >= 900 > r["stages"]["low"]["steps"][0]["t"]
        assert res["host_peak_rss_gib"] > 0
    assert data["results"]["w4a4"]["loader"] == "WanW4A4LoadModel"
    assert "WanW4A4LoadModel" in data["results"]["w4a4"]["load"]["high"]["how"]

    lo = data["results"]["w4a4_lora"]
    assert "LoraLoaderModelOnly" in lo["load"]["high"]["how"]
    assert lo["lora"]["rank"] == 64 and lo["lora"]["patches_per_expert"] == {"high": 20, "low": 20}  # 2 blocks x 10
    for stage in ("high", "low"):
        assert lo["modes"]["one-expert"]["stages"][stage]["lora_folded"] == {"layers": 20, "ranks": [64]}
    plain = data["results"]["w4a4"]["modes"]["one-expert"]["stages"]["high"]["lora_folded"]
    assert plain == {"layers": 0, "ranks": []}
    assert "cond_batch 'auto'" in data["results"]["bf16_split"]["load"]["high"]["how"]
    # ComfyUI up to 0.3.64 leaves Wan in training mode (which turns its fp8_e4m3fn_fast's fp8 matmul off); later
    # ComfyUI (0.33) puts every diffusion model in eval mode. The eval reference is in eval mode on both.
    split = data["results"]["bf16_split"]
    assert split["load"]["high"]["training_mode"] is leaves_wan_in_training_mode(split["env"]["comfyui"])
    f8e = data["results"]["fp8_fast_eval"]["load"]
    assert all(v["training_mode"] is False and v["how"].endswith("diffusion_model.eval()") for v in f8e.values())
    assert data["results"]["bf16"]["load"]["high"]["block_weight"].startswith("Parameter torch.float")
    # The W4A4 models' blocks run through nodes/graphs.py's patches (on: WAN_W4A4_BLOCK_GRAPHS=1 above); on the CPU
    # every call stays eager, and says why.
    graphs = data["results"]["w4a4"]["block_graphs"]
    assert graphs["high"]["captures"] == graphs["high"]["replays"] == 0 and graphs["high"]["eager"] > 0
    assert set(graphs["high"]["why"]) == set(graphs["low"]["why"]) == {"not on a GPU"}
    assert data["results"]["bf16"]["block_graphs"] == {"high": None, "low": None}
    assert data["results"]["w4a4"]["load"]["high"]["block_weight"] == "none"
    assert "error" in data["results"]["w4a4"]["profile"]  # --profile on the CPU: said, not faked

    text = md.read_text()
    assert text.startswith("# End-to-end benchmark results")
    assert "| bf16 | default |" in text and "| w4a4 | default |" in text
    assert "rank-64 LoRA on every block Linear: peak allocated" in text
    assert "target" not in text and " met" not in text and "missed" not in text  # numbers, no verdicts

    # A second run reuses the files and skips a configuration that the budget leaves no time for.
    p = run_bench(comfyui, tmp_path / "work", "--config", "bf16", "--budget-s", "120", "--min-child-s", "1000",
                  "--json", str(out_json), "--results-md", "none")
    data = json.loads(out_json.read_text())
    assert data["meta"]["generate"]["bf16_generated"] is False, p.stdout[-3000:]
    assert "skipped" in data["results"]["bf16"]
    assert p.returncode == 1  # a configuration without result is a failure of the run

    # The fp8_scaled configuration writes and reads its own file (no BF16 file needed), as a user loads it. One expert
    # at a time, as the GPU runs: on the CPU, ComfyUI 0.33's default memory mode fails inside ComfyUI when it partially
    # loads an fp8_scaled expert (ops._quantized_apply: "Cannot set version_counter for inference tensor").
    p = run_bench(comfyui, tmp_path / "work8", "--config", "fp8_scaled", "--memory", "one-expert",
                  "--json", str(out_json), "--results-md", "none")
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    data = json.loads(out_json.read_text())
    gen = data["meta"]["generate"]
    assert gen["fp8_scaled_generated"] and Path(gen["fp8_scaled_file"]).is_file() and gen["bf16_file"] is None
    f8s = data["results"]["fp8_scaled"]
    for v in f8s["load"].values():
        assert "_fp8_scaled.safetensors" in v["how"] and "eval" not in v["how"]
        assert v["training_mode"] is leaves_wan_in_training_mode(f8s["env"]["comfyui"])
        assert "float8_e4m3fn" in v["block_weight"]
    assert f8s["modes"]["one-expert"]["output_finite"]


@pytest.mark.comfyui
def test_bench_e2e_rejects_bad_arguments(comfyui, tmp_path):
    p = run_bench(comfyui, tmp_path, "--config", "int8")
    assert p.returncode == 2 and "unknown configuration" in p.stderr
    p = run_bench(comfyui, tmp_path, "--all", "--frames", "80")
    assert p.returncode == 2 and "1 + 4k" in p.stderr


def leaves_wan_in_training_mode(comfyui_version: str) -> bool:
    """Whether that ComfyUI leaves a loaded Wan model in training mode: 0.3.64 does (its ``BaseModel``
    calls ``eval()`` for a few other models only); later ComfyUI (0.33) puts every diffusion model in eval mode."""
    version = tuple(int(p) for p in comfyui_version.split(".")[:3])  # "unknown" fails here, loudly
    return version <= (0, 3, 64)


def _bench(module: str):
    """``benchmarks/wan_e2e/<module>``, imported as the entry point imports it (benchmarks/ on the path)."""
    import importlib
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module(f"wan_e2e.{module}")
    finally:
        sys.path.remove(str(SCRIPT.parent))


class _Event:
    def __init__(self, key, us, count, device="DeviceType.CUDA"):
        self.key, self.self_device_time_total, self.count, self.device_type = key, us, count, device


class _Prof:
    def __init__(self, events):
        self.events = events

    def key_averages(self):
        return self.events


def test_profile_summary_and_report():
    """--profile's summary of one call (families, shares, top kernels) and its report table, from a
    profiler-shaped input: the GPU run fills them from torch.profiler (no GPU here)."""
    bench = _bench("profiling")
    assert bench.kernel_family("_gemm_i8_tma_kernel") == "W4A4 GEMM (Triton)"
    assert bench.kernel_family("_act_quant_kernel") == "W4A4 quantize (Triton)"
    assert bench.kernel_family("_act_quant_fused_kernel") == "W4A4 quantize (Triton)"  # few tokens: one launch
    assert bench.kernel_family("_prologue_kernel") == "W4A4 quantize (Triton)"  # ... joined with the expansion
    assert bench.kernel_family("_gemm_i8_pp_kernel") == "W4A4 GEMM (Triton)"
    assert bench.kernel_family("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert bench.kernel_family("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_TNT") == "dense GEMM (cuBLAS/CUTLASS)"
    assert bench.kernel_family("void at::native::vectorized_elementwise_kernel<4>") == "norm / elementwise / copies"
    assert bench.kernel_family("some_kernel") == "other"
    prof = _Prof([_Event("void pytorch_flash::flash_fwd_kernel<x>", 600_000, 40),
                  _Event("_gemm_i8_tma_kernel", 250_000, 400), _Event("_act_quant_kernel", 100_000, 400),
                  _Event("void at::native::vectorized_elementwise_kernel<4>", 50_000, 900),
                  _Event("aten::mm", 999_000, 3, device="DeviceType.CPU")])  # CPU-side op: not a kernel
    p = bench.kernel_profile(prof)
    assert p["gpu_ms"] == 1000.0
    assert p["families"]["attention"] == {"ms": 600.0, "share": 0.6, "calls": 40}
    assert [k["name"] for k in p["top"]][:2] == ["void pytorch_flash::flash_fwd_kernel<x>", "_gemm_i8_tma_kernel"]
    p.update(mode="one-expert", stage="low", expert="low", batch=1, wall_s=1.05)
    md = _bench("report").profile_md({"w4a4": {"profile": p}, "bf16": {"profile": {"error": "none"}}})
    assert "| attention | 600.0 (60.0 %) |" in md and "| **all kernels** | **1000.0** |" in md
    assert "| call wall time | 1050.0 |" in md and "Top kernels, w4a4" in md and "bf16" not in md


def test_host_profile_ranks_functions_by_own_time_and_the_report_lists_them():
    """WAN_BENCH_PYPROF's summary: a pstats-shaped input, rows by own time, times in ms, file named by its
    last two path parts; the report's table lists them under the configuration."""
    host_profile = _bench("profiling").host_profile
    stats = type("S", (), {"stats": {("/a/b/nodes/ops.py", 10, "w4a4_forward"): (400, 400, 0.002, 0.150, {}),
                                     ("/x/comfy/ops.py", 337, "cast_bias_weight"): (400, 400, 0.030, 0.040, {}),
                                     ("~", 0, "<built-in method torch.empty>"): (9, 9, 0.0001, 0.0001, {})}})()
    rows = host_profile(stats, top=2)
    assert rows == [{"function": "comfy/ops.py:337(cast_bias_weight)", "calls": 400, "own_ms": 30.0, "cum_ms": 40.0},
                    {"function": "nodes/ops.py:10(w4a4_forward)", "calls": 400, "own_ms": 2.0, "cum_ms": 150.0}]
    assert [r["function"] for r in host_profile(stats, top=2, by="cum_ms")] == [
        "nodes/ops.py:10(w4a4_forward)", "comfy/ops.py:337(cast_bias_weight)"]  # host_cum: by the time under each
    md = _bench("report").profile_md({"w4a4": {"profile": {
        "families": {}, "gpu_ms": 1.0, "top": [], "mode": "one-expert", "stage": "low", "call": 2, "expert": "low",
        "batch": 1, "wall_s": 0.1, "host_top": rows}}})
    assert "Host functions of that call, w4a4" in md
    assert "| `comfy/ops.py:337(cast_bias_weight)` | 400 | 30.0 | 40.0 |" in md


def test_profile_call_picks_the_stages_nth_call_and_never_the_process_first():
    """--profile-call N: the N-th call of the stage (the default, 1, its first), or the next warm one when that
    is the process's first call (which compiles the kernels); the report says which call it was."""
    due = _bench("child").profile_due
    assert [due(n, 1, True) for n in range(3)] == [True, True, True]  # the caller stops after one profile
    assert not due(0, 1, False) and due(1, 1, True)
    assert [due(n, 3, True) for n in range(4)] == [False, False, True, True]
    md = _bench("report").profile_md({"w4a4": {"profile": {
        "families": {}, "gpu_ms": 1.0, "top": [], "mode": "one-expert", "stage": "low", "call": 3, "expert": "low",
        "batch": 1, "wall_s": 0.1}}})
    assert "call 3 of the low stage" in md
    with pytest.raises(SystemExit):
        _bench("cli").parse_args(["--config", "w4a4", "--profile", "--profile-call", "0"])


def test_step_medians_leave_out_each_stages_first_step_and_the_warm_up():
    """A stage's first step brings its expert to the GPU (seconds at one frame under dynamic VRAM): like the
    process's first call and a profiled call, it is not a step time. Cond and uncond in two calls are one step."""
    child = _bench("child")
    timer = child.StepTimer(cuda=False, bases={})
    calls = [("high", 1.0, 20.0, True, False), ("high", 0.9, 0.3, False, False), ("high", 0.8, 0.2, False, False),
             ("low", 0.7, 3.5, False, False), ("low", 0.6, 0.7, False, True), ("low", 0.6, 0.1, False, False),
             ("low", 0.5, 0.2, False, False), ("low", 0.5, 0.2, False, False)]
    for stage, sigma, s, first, profiled in calls:
        timer.calls.append({"mode": "one-expert", "stage": stage, "sigma": sigma, "t": 1000 * sigma, "s": s, "batch": 1,
                            "first_of_process": first, "profiled": profiled})
    high, low = timer.steps("one-expert", "high"), timer.steps("one-expert", "low")
    assert [s["first_of_stage"] for s in low] == [True, False, False]
    assert child.steady_step_times(high) == [0.3, 0.2]  # the process's first call is the stage's first step
    assert child.steady_step_times(low) == [0.4]  # not the load (3.5), not the profiled step (0.7 + 0.1)
    assert low[2]["s"] == 0.4 and low[2]["batches"] == [1, 1]


def test_gpu_busy_is_the_union_of_kernel_intervals():
    """The GPU's busy time in a profiled call: overlapping kernels (two streams) count once, gaps not at
    all; span runs from the first start to the last end."""
    busy_ms = _bench("profiling").busy_ms
    assert busy_ms([]) == (0.0, 0.0)
    assert busy_ms([(0, 1000), (500, 1500), (3000, 4000), (3200, 3300)]) == (2.5, 4.0)
    assert busy_ms([(3000, 4000), (0, 1000)]) == (2.0, 4.0)


def test_lora_cost_uses_exact_bytes():
    """The LoRA's cost is about its own size (0.571 GiB), so GiB to 3 decimals (+-1 MiB) cannot show it:
    with exact bytes recorded the report gives MiB from them; older runs keep the GiB numbers. The
    report states the numbers and no verdict."""
    report, weights, common = _bench("report"), _bench("weights"), _bench("common")
    data = json.loads((SCRIPT.parent / "results" / "e2e_h100_2026-11-21_lora_profile.json").read_text())
    results = data["results"]
    old = report.comparisons_md(results)
    assert "+0.580 GiB" in old and "1 expert(s) resident: 0.571 GiB" in old  # the H100 run before exact bytes
    per = weights.bytes_lora_bf16(common.arch_of("real"), 64)
    assert per == 40 * 64 * 2 * (8 * (5120 + 5120) + 2 * (5120 + 13824))  # 400 block Linears, bf16
    results["w4a4_lora"]["lora"]["bf16_bytes_per_expert"] = per
    base = 11_403_000_000
    results["w4a4"]["modes"]["one-expert"]["peak_alloc_bytes"] = base
    for extra in (per, per + 3 * 2**20):
        results["w4a4_lora"]["modes"]["one-expert"]["peak_alloc_bytes"] = base + extra
        text = report.comparisons_md(results)
        assert f"({extra / 2**20:+.1f} MiB; the LoRA is 585.0 MiB in BF16 per expert" in text, text
        assert "1 expert(s) resident: 585.0 MiB)" in text, text
        assert not any(w in text for w in ("target", "bound", " met", "missed")), text


def test_w4a4_layer_is_the_packs_rtn_layer():
    """The benchmark's W4A4 layers are the pack's: calibration.lowrank.low_rank's branch, numerics'
    RTN residual, unsigned activations exactly where calibration puts them; and the branch is worth
    having (the output error of a weight with a strong low-rank part drops against rank 0)."""
    import torch
    from wan_w4a4.calibration.config import UNSIGNED_LINEARS
    from wan_w4a4.calibration.lowrank import low_rank
    from wan_w4a4.kernels import numerics as nm

    weights = _bench("weights")
    g = torch.Generator().manual_seed(3)
    n, k = 96, 128
    w = (0.02 * torch.randn(n, k, generator=g) + torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g)
         ).to(torch.bfloat16)
    bias = (0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)
    p = weights.w4a4_layer(w, bias, "blocks.1.self_attn.q", 8, 2)
    l1, l2 = low_rank(w.float(), 8)
    assert torch.equal(p.lr_down, l1) and torch.equal(p.lr_up, l2)
    assert p.clip.tolist() == [1.0, 1.0] and torch.equal(p.bias, bias.float()) and not p.act_unsigned
    for name in ("ffn.0", "ffn.2", "cross_attn.o"):
        assert weights.w4a4_layer(w, None, f"blocks.0.{name}", 8, 2).act_unsigned is (name in UNSIGNED_LINEARS)
    x = torch.randn(64, k, generator=g)
    ref = x @ w.float().T + bias.float()
    plain = weights.w4a4_layer(w, bias, "blocks.1.self_attn.q", 0, 2)
    assert p.lr_down.shape == (k, 8) and plain.lr_down.shape == (k, 0)
    assert nm.sqnr_db(ref, nm.w4a4_linear(x, p)) > nm.sqnr_db(ref, nm.w4a4_linear(x, plain)) + 6.0
