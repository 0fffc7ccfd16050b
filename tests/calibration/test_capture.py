"""Capture hooks during real ComfyUI sampling of a tiny Wan2.2-shaped expert (CPU).

The statistics must equal a direct computation on the inputs the Linears really received
(recorded here by independent hooks), binned by the model timestep of each call.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from wan_w4a4.calibration import capture as C
from wan_w4a4.calibration.config import CalibrationConfig, bin_edges, bin_of
from wan_w4a4.kernels import format as fmt

pytestmark = pytest.mark.comfyui




@pytest.fixture(scope="module")
def high_model(comfy_nodes, tiny_wan_checkpoints):
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(tiny_wan_checkpoints["high"]))


def _items(n=2, **kw):
    return C.synthetic_items(n, frames=5, height=32, width=32, text_tokens=8, **kw)


class Recorder:
    """Independent record of every model call: its timestep (1000 sigma) and the inputs of some Linears."""

    def __init__(self, model, names):
        self.calls, self.names, self.model = [], names, model
        inner = model.model.diffusion_model
        self.handles = [C._get(inner, n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args):
            self.calls[-1]["x"].setdefault(name, []).append(args[0].detach().clone())
        return hook

    def wrapper(self, executor, x, t, *args, **kwargs):
        self.calls.append({"t": 1000.0 * float(t.flatten()[0]), "x": {}})
        return executor(x, t, *args, **kwargs)

    def rows(self, name, calls=None):
        calls = self.calls if calls is None else calls
        return torch.cat([torch.cat(c["x"][name]).reshape(-1, c["x"][name][0].shape[-1]) for c in calls])

    def close(self):
        for h in self.handles:
            h.remove()


def _capture(model, cfg, names, blocks=(0,), items=None):
    import comfy.patcher_extension
    m = C.with_shift(model, cfg.shift)
    rec = Recorder(model, names)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.recorder", rec.wrapper)
    _, ts = C.schedule(m, cfg)
    switch = C.switch_step(ts, cfg.boundary)
    cap = C.ExpertCapture(model, "high", C.plan_layers(model, cfg), cfg, blocks=blocks)
    items = items or _items()
    try:
        C.run_capture(m, "high", items, [it.latent for it in items], cfg, cap, switch)
    finally:
        rec.close()
    return cap, rec, switch, ts


NAMES = ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v",
         "blocks.0.cross_attn.k", "blocks.0.cross_attn.v", "blocks.0.ffn.2"]


def test_statistics_equal_direct_computation(high_model):
    cfg = CalibrationConfig(steps=6, bins=2, rows_per_bin=4096)  # reservoirs large enough to keep every row
    cap, rec, switch, ts = _capture(high_model, cfg, NAMES)

    # the high expert ran exactly the steps with t >= boundary, cond and uncond in one batch
    assert switch == int((ts >= 900).sum()) and 0 < switch < cfg.steps
    assert len(rec.calls) == 2 * switch
    assert all(c["t"] >= 900 for c in rec.calls)
    assert cap.timesteps == pytest.approx([c["t"] for c in rec.calls], abs=1e-3)

    # sharing: q/k/v see one tensor, cross-attention k/v one context
    for c in rec.calls:
        for a, b in (("self_attn.q", "self_attn.k"), ("self_attn.q", "self_attn.v"), ("cross_attn.k", "cross_attn.v")):
            assert torch.equal(c["x"][f"blocks.0.{a}"][0], c["x"][f"blocks.0.{b}"][0])
    assert set(cap.groups) == {f"blocks.0.{g}" for g in ("self_attn.qkv", "self_attn.o", "cross_attn.q",
                                                          "cross_attn.kv", "cross_attn.o", "ffn.0", "ffn.2")}

    edges = bin_edges("high", 2)
    assert edges == (1000.0, 950.0, 900.0)
    for name, group in (("blocks.0.self_attn.q", "blocks.0.self_attn.qkv"),
                        ("blocks.0.cross_attn.k", "blocks.0.cross_attn.kv"),
                        ("blocks.0.ffn.2", "blocks.0.ffn.2")):
        g = cap.groups[group]
        x = rec.rows(name).double()
        assert g.stats.count == x.shape[0]
        torch.testing.assert_close(g.stats.h.double(), x.T @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g.absmax.double(), x.abs().amax(0), rtol=0, atol=0)
        torch.testing.assert_close(g.stats.xsum, x.sum(0), rtol=1e-9, atol=1e-6)
        # bins by timestep, computed here without bin_of: [950, 1000] -> 0, [900, 950) -> 1
        for b, calls in enumerate(([c for c in rec.calls if c["t"] >= 950], [c for c in rec.calls if c["t"] < 950])):
            r = g.rows(b).double()
            assert g.reservoirs[b].seen == r.shape[0]
            if not calls:
                assert r.shape[0] == 0
                continue
            xb = rec.rows(name, calls).to(torch.bfloat16).double()  # reservoirs keep bf16 rows
            assert r.shape == xb.shape
            torch.testing.assert_close(r.T @ r, xb.T @ xb, rtol=1e-6, atol=1e-6)  # same rows, any order
    assert sum(cap.bin_rows()) == rec.rows("blocks.0.self_attn.q").shape[0]


def test_hooks_live_only_during_sampling(high_model):
    cfg = CalibrationConfig(steps=4, bins=1, rows_per_bin=16)
    inner = high_model.model.diffusion_model
    cap, rec, *_ = _capture(high_model, cfg, [], blocks=(0, 1))
    assert len(cap.groups) == 14 and all(g.stats.count > 0 for g in cap.groups.values())
    for name, mod in inner.named_modules():
        assert not mod._forward_pre_hooks, f"hook left on {name}"
    wrappers = high_model.model_options.get("transformer_options", {}).get("wrappers", {})
    assert C.WRAPPER_KEY not in wrappers.get("apply_model", {})


def test_token_fraction_subsamples_hessian_not_range(high_model):
    cfg = CalibrationConfig(steps=4, bins=1, rows_per_bin=4096, token_fraction=0.5)
    cap, rec, *_ = _capture(high_model, cfg, ["blocks.0.ffn.0"])
    g = cap.groups["blocks.0.ffn.0"]
    x = rec.rows("blocks.0.ffn.0")
    per_call = [torch.cat(c["x"]["blocks.0.ffn.0"]).reshape(-1, x.shape[1]).shape[0] for c in rec.calls]
    assert g.stats.count == sum(math.ceil(0.5 * n) for n in per_call) < x.shape[0]
    torch.testing.assert_close(g.absmax, x.abs().amax(0).float(), rtol=0, atol=0)
    assert len(g.reservoirs[0]) == g.stats.count


def test_nan_activation_names_layer_and_bin(high_model):
    cfg = CalibrationConfig(steps=4, bins=2, rows_per_bin=16)
    items = _items(1)
    items[0].positive[0][0][0, 3, 5] = float("nan")  # the text context -> cross-attention k/v
    with pytest.raises(C.CalibrationError, match=r"blocks\.0\.cross_attn\.kv \(high expert, bin 0: t in"):
        _capture(high_model, cfg, [], items=items)
    for name, mod in high_model.model.diffusion_model.named_modules():
        assert not mod._forward_pre_hooks, f"hook left on {name} after an error"


def test_not_a_wan_model():
    cfg = CalibrationConfig()
    with pytest.raises(C.CalibrationError, match="not a ComfyUI MODEL"):
        C.plan_layers(object(), cfg)
    fake = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(4, 4)))
    with pytest.raises(C.CalibrationError, match="is not a Wan model"):
        C.plan_layers(fake, cfg, "the high-noise model")


def test_plan_layers_and_keep_list(high_model):
    specs = C.plan_layers(high_model, CalibrationConfig())
    assert len(specs) == 20 and specs[0].name == "blocks.0.self_attn.q"
    assert [s.name for s in specs if s.unsigned] == ["blocks.0.ffn.2", "blocks.1.ffn.2"]
    kept = C.plan_layers(high_model, CalibrationConfig(keep=(1, "*.self_attn.o"), unsigned_ffn2=False))
    assert [s.name for s in kept] == [f"blocks.0.{n}" for n in ("self_attn.q", "self_attn.k", "self_attn.v",
                                                                 "cross_attn.q", "cross_attn.k", "cross_attn.v",
                                                                 "cross_attn.o", "ffn.0", "ffn.2")]
    assert not any(s.unsigned for s in kept)


def test_bins_match_the_state_format():
    for expert in ("high", "low"):
        edges = bin_edges(expert, 4)
        meta = fmt.StateMeta(expert=expert, bin_edges=edges)
        for t in (1000.0, 999.0, 975.0, 950.0, 925.0, 900.0, 899.9, 675.0, 450.0, 1.0, 0.0):
            assert bin_of(t, edges) == meta.bin_index(t)
    assert bin_of(900.0, bin_edges("high", 4)) == 3 and bin_of(900.0, bin_edges("low", 4)) == 0


def test_block_passes():
    assert C.block_passes([0, 1, 2, 3, 4], None) == [[0, 1, 2, 3, 4]]
    assert C.block_passes([0, 1, 2, 3, 4], 2) == [[4], [0, 1], [2, 3]]  # the last blocks' pass first
    assert C.block_passes([3, 1, 2, 1], 1) == [[3], [1], [2]]
    assert C.block_passes([], 2) == []


# The sampling of example_workflows/wan22_i2v_14b_w4a4.json (ComfyUI's current Wan2.2 14B I2V template,
# shift 5): 20 steps handed over after step 10, and the 4-step lightx2v LoRA path handed over after step 2.
@pytest.mark.parametrize("steps,step,high_ts,low_ts", [
    (20, 10, [1000.0, 989.6, 978.3, 965.9, 952.4, 937.5, 921.1, 902.8, 882.4, 859.4],
     [833.3, 803.6, 769.2, 729.2, 681.8, 625.0, 555.6, 468.8, 357.1, 208.3]),
    (4, 2, [1000.0, 937.5], [833.3, 625.0]),
])
def test_handover_by_step_bins_cover_each_experts_timesteps(comfy_nodes, high_model, steps, step, high_ts, low_ts):
    from wan_w4a4.nodes.hook import TimestepBinHook
    from wan_w4a4.nodes.ops import BinSelector

    cfg = CalibrationConfig(steps=steps, shift=5.0, handover_step=step)
    _, ts = C.schedule(C.with_shift(high_model, cfg.shift), cfg)
    # the timesteps calibration samples at are the workflow's: ModelSamplingSD3(5) + KSampler's schedule
    (wf,) = comfy_nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]().patch(high_model, 5.0)
    import comfy.samplers
    ms = wf.get_model_object("model_sampling")
    assert torch.equal(ts, ms.timestep(comfy.samplers.calculate_sigmas(ms, "simple", steps)[:-1]).float())
    assert [round(float(t), 1) for t in ts] == high_ts + low_ts

    switch, boundary = C.handover(ts, cfg)
    assert switch == step and low_ts[0] < boundary < high_ts[-1]
    for expert, run in (("high", ts[:switch]), ("low", ts[switch:])):
        edges = cfg.edges(expert, run.tolist(), boundary)
        hook = TimestepBinHook(expert, edges, BinSelector(cfg.bins))
        assert all(hook.bin_of(float(t))[1] for t in run), (expert, edges, run)  # in range: no warning
        assert edges[0] == (1000.0 if expert == "high" else boundary)
        assert edges[-1] == (boundary if expert == "high" else 0.0)

    # the boundary rule (default, t >= 900) hands over earlier when shift 5 puts step 8 below 900:
    # a workflow handing over at step 10 would then run the high expert outside its bins
    assert C.handover(ts, CalibrationConfig(steps=steps, shift=5.0)) == (sum(t >= 900 for t in high_ts), 900.0)
    if steps == 20:
        assert C.switch_step(ts, 900.0) == 8


def test_handover_step_is_validated():
    with pytest.raises(ValueError, match=r"handover_step must be None .* 1\.\.19"):
        CalibrationConfig(steps=20, handover_step=20)
    with pytest.raises(ValueError, match="handover_step"):
        CalibrationConfig(steps=20, handover_step=0)
    assert CalibrationConfig(steps=20, handover_step=19).handover_step == 19
