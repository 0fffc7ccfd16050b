"""The GPU memory budget of calibration (``calibration/budget.py``): its sizes are the bytes the
statistics really allocate, its plan is the largest pass that fits, bad budgets are refused before any
work, and a run under a budget uses the planned passes. (The budget on a GPU, under a memory cap, is
measured by the benchmark: ``benchmarks/RESULTS.md``.)"""
from __future__ import annotations

import json

import pytest
import torch
from wan_w4a4.calibration import (
    CalibrationConfig,
    CalibrationError,
    budget,
    calibrate,
    synthetic_items,
)
from wan_w4a4.calibration.capture import GroupStats, LayerSpec

GiB = 2**30


def _a14b_specs(blocks=40, dim=5120, ffn=13824) -> list[LayerSpec]:
    """The quantized layers of Wan2.2-I2V-A14B's blocks, with their input groups."""
    specs = []
    for b in range(blocks):
        def add(name, group, k, n, unsigned=False, b=b):
            specs.append(LayerSpec(f"blocks.{b}.{name}", b, f"blocks.{b}.{group}", k, n, unsigned))
        for p in ("q", "k", "v"):
            add(f"self_attn.{p}", "self_attn.qkv", dim, dim)
        add("self_attn.o", "self_attn.o", dim, dim)
        add("cross_attn.q", "cross_attn.q", dim, dim)
        for p in ("k", "v"):
            add(f"cross_attn.{p}", "cross_attn.kv", dim, dim)
        add("cross_attn.o", "cross_attn.o", dim, dim)
        add("ffn.0", "ffn.0", dim, ffn)
        add("ffn.2", "ffn.2", ffn, dim, unsigned=True)
    return specs


def _device_bytes(g: GroupStats) -> int:
    stats = [g.stats] + ([g.range] if g.range is not None else [])
    return sum(t.nbytes for s in stats for t in (s.h, s.xsum, s.xmin, s.xmax) if t is not None)


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_sizes_are_what_the_statistics_allocate(fraction):
    cfg = CalibrationConfig(token_fraction=fraction, rows_per_bin=8)
    specs = _a14b_specs(blocks=2, dim=64, ffn=176)
    made = {}
    for s in specs:
        made.setdefault(s.group, GroupStats(s.group, s.in_features, cfg, "high", "cpu"))
    per_block = {}
    for key, g in made.items():
        b = int(key.split(".")[1])
        per_block[b] = per_block.get(b, 0) + _device_bytes(g)
    assert budget.block_bytes(specs, cfg) == per_block


def test_the_plan_is_the_largest_pass_that_fits():
    specs = _a14b_specs()
    per_block = budget.block_bytes(specs, CalibrationConfig())[0]
    assert 1.29 * GiB < per_block < 1.31 * GiB  # 6 inputs of 5120 and one of 13824, fp32 Hessians
    for gib in (4, 24, 48, 80):
        cfg = CalibrationConfig(gpu_budget_gib=gib)
        n = budget.blocks_per_pass(specs, cfg)
        limit = budget.STATS_SHARE * gib * GiB
        assert n * per_block <= limit < (n + 1) * per_block, gib
        budget.check(specs, CalibrationConfig(gpu_budget_gib=gib, blocks_per_pass=n), "model")
    assert budget.blocks_per_pass(specs, CalibrationConfig(gpu_budget_gib=24)) == 7
    assert budget.blocks_per_pass(specs, CalibrationConfig(gpu_budget_gib=24, blocks_per_pass=3)) == 3
    assert budget.blocks_per_pass(specs, CalibrationConfig()) is None  # no budget: one pass, as before


def test_budgets_that_cannot_work_are_refused_before_any_work():
    specs = _a14b_specs()
    with pytest.raises(CalibrationError, match=r"1 block\(s\) per pass need 1\.30 GiB.*raise the budget"):
        budget.check(specs, CalibrationConfig(gpu_budget_gib=3), "the high-noise model")
    with pytest.raises(CalibrationError, match=r"10 block\(s\) per pass need 12\.99 GiB.*lower blocks_per_pass"):
        budget.check(specs, CalibrationConfig(gpu_budget_gib=24, blocks_per_pass=10), "the high-noise model")
    for bad in (0, -1, float("nan"), float("inf"), True, "24"):
        with pytest.raises(ValueError, match="gpu_budget_gib"):
            CalibrationConfig(gpu_budget_gib=bad)


def test_comfyui_reserve_is_untouched_off_the_gpu(comfy_nodes):
    import comfy.model_management as mm

    before = mm.EXTRA_RESERVED_VRAM
    with budget.comfy_budget(CalibrationConfig(gpu_budget_gib=1), "cpu"):
        assert mm.EXTRA_RESERVED_VRAM == before
    assert mm.EXTRA_RESERVED_VRAM == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_comfyui_sees_a_device_of_the_budget(comfy_nodes):
    import comfy.model_management as mm

    before = mm.EXTRA_RESERVED_VRAM
    total = torch.cuda.get_device_properties(0).total_memory
    with budget.comfy_budget(CalibrationConfig(gpu_budget_gib=8), "cuda"):
        assert mm.EXTRA_RESERVED_VRAM == total - int((8 - budget.HOOK_RESERVE_GIB) * GiB)
    assert mm.EXTRA_RESERVED_VRAM == before


@pytest.mark.slow  # calibrations of their own
def test_a_run_under_a_budget_takes_the_planned_passes(comfy_nodes, tiny_wan_checkpoints, tmp_path):
    """A tiny run (two blocks) whose budget fits the statistics of one block per pass samples in passes
    of one, and its states equal those of the same passes asked for explicitly."""
    import comfy.sd

    models = {e: comfy.sd.load_diffusion_model(str(tiny_wan_checkpoints[e])) for e in ("high", "low")}
    fast = {"steps": 4, "bins": 2, "rank": 4, "alphas": (0.5,), "clip_grid": (1.0, 0.8), "rows_per_bin": 16}
    from wan_w4a4.calibration.capture import plan_layers

    specs = plan_layers(models["high"], CalibrationConfig(**fast))
    sizes = budget.block_bytes(specs, CalibrationConfig(**fast))
    assert len(sizes) == 2
    gib = (max(sizes.values()) + min(sizes.values()) // 2) / budget.STATS_SHARE / GiB  # one block fits, not two
    items = synthetic_items(1, frames=5, height=32, width=32, text_tokens=8)
    res = calibrate(models["high"], models["low"], items,
                    CalibrationConfig(**fast, gpu_budget_gib=gib, out_dir=str(tmp_path / "b"), name="b"))
    report = json.loads(res.report.read_text())
    passes = report["experts"]["high"]["passes"]
    assert passes == [[1], [0]]  # one block each, the last block's pass first (capture.block_passes)
    ref = calibrate(models["high"], models["low"], items,
                    CalibrationConfig(**fast, blocks_per_pass=1, out_dir=str(tmp_path / "r"), name="r"))
    from safetensors.torch import load_file

    for e in ("high", "low"):
        a, b = load_file(str(getattr(res, e))), load_file(str(getattr(ref, e)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
