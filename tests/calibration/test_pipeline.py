"""calibrate() end to end on tiny Wan2.2-shaped experts through the real ComfyUI (CPU)."""
from __future__ import annotations

import gc
import json
import logging
import weakref

import pytest
import torch

from wan_w4a4.calibration import (CalibrationCancelled, CalibrationConfig, CalibrationError, calibrate,
                                  synthetic_items)
from wan_w4a4.calibration import capture as C
from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics

# Small grids keep a run at a few seconds; the method is the default one otherwise.
# bin_spacing "uniform" on purpose: 6 steps at shift 8 leave the low expert's bin [450, 0) empty,
# which exercises the empty-bin fallback (the default, "steps", avoids empty bins).
FAST = dict(steps=6, bins=2, rank=8, alphas=(0.25, 0.5, 0.75), clip_grid=(1.0, 0.9, 0.8, 0.7), rows_per_bin=64,
            bin_spacing="uniform")




def _items(n=2):
    return synthetic_items(n, frames=5, height=32, width=32, text_tokens=8)


@pytest.fixture(scope="module")
def models(comfy_nodes, tiny_wan_checkpoints):
    import comfy.sd
    return {e: comfy.sd.load_diffusion_model(str(tiny_wan_checkpoints[e])) for e in ("high", "low")}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def calibrated(models, tmp_path_factory):
    """One per-bin run; with steps=6 the low expert's timesteps all fall in its first bin."""
    out = tmp_path_factory.mktemp("calib")
    cfg = CalibrationConfig(**FAST, out_dir=str(out))
    handler = _Records()
    logging.getLogger("wan_w4a4").addHandler(handler)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    calls = []
    try:
        result = calibrate(models["high"], models["low"], _items(), cfg, progress=lambda *a: calls.append(a))
    finally:
        logging.getLogger("wan_w4a4").removeHandler(handler)
        torch.set_num_threads(n)
    return {"result": result, "config": cfg, "logs": handler.records, "progress": calls, "out": out}


pytestmark = pytest.mark.comfyui


def test_states_load_and_carry_the_config(calibrated):
    res, cfg = calibrated["result"], calibrated["config"]
    for expert in ("high", "low"):
        layers, meta = fmt.load_state(getattr(res, expert))
        assert meta.expert == expert and meta.bin_edges == cfg.edges(expert) and meta.clip_policy == "per-bin"
        assert len(layers) == 20 and meta.fingerprint
        p = layers["blocks.0.ffn.2"]
        assert p.act_unsigned and p.act_shift == numerics.GELU_SHIFT and p.rank == 8 and p.num_bins == 2
        assert not layers["blocks.0.ffn.0"].act_unsigned
    assert fmt.read_meta(res.high).fingerprint != fmt.read_meta(res.low).fingerprint
    report = json.loads(res.report.read_text())
    assert report["experts"]["low"]["bin_rows"][1] == 0 and report["experts"]["high"]["steps"] == 3
    done = [c[0] for c in calibrated["progress"]]
    assert done == sorted(done) and done[-1] == calibrated["progress"][-1][1]
    texts = [c[2] for c in calibrated["progress"]]  # phase, pass, layer and ETA (calibration/progress.py)
    assert "high expert, pass 1/1: sampling 2 items x 3 steps | ETA ?" in texts
    assert any(t.startswith("low expert, pass 1/1: quantized blocks.1.ffn.2 | ETA ") for t in texts)
    assert texts[-1].endswith("| ETA 0:00:00")
    assert not [p for p in calibrated["out"].iterdir() if p.name.startswith(".")]  # no temp files left


def test_layers_beat_rtn_on_captured_rows(calibrated, models):
    """Re-capture the high expert's inputs; every calibrated layer beats plain RTN W4A4 on them."""
    res, cfg = calibrated["result"], calibrated["config"]
    layers, meta = fmt.load_state(res.high)
    model = models["high"]
    m = C.with_shift(model, cfg.shift)
    cfg_all = CalibrationConfig(**{**FAST, "rows_per_bin": 4096}, out_dir=cfg.out_dir)
    _, ts = C.schedule(m, cfg_all)
    cap = C.ExpertCapture(model, "high", C.plan_layers(model, cfg_all), cfg_all)
    items = _items()
    C.run_capture(m, "high", items, [it.latent for it in items], cfg_all, cap, C.switch_step(ts, cfg.boundary))
    for spec in C.plan_layers(model, cfg_all):
        w, b = C.layer_weight(model, spec.name)
        w, b = w.float(), b.float()
        p, plain = layers[spec.name], numerics.from_float(w, b)
        ref, ours, rtn = [], [], []
        for k in range(cfg.bins):
            x = cap.groups[spec.group].rows(k).float()
            if x.shape[0]:
                ref.append(x @ w.T + b)
                ours.append(numerics.w4a4_linear(x, p, k))
                rtn.append(numerics.w4a4_linear(x, plain, 0))
        ref, ours, rtn = torch.cat(ref), torch.cat(ours), torch.cat(rtn)
        s_ours, s_rtn = numerics.sqnr_db(ref, ours), numerics.sqnr_db(ref, rtn)
        assert s_ours > s_rtn + 3.0, f"{spec.name}: {s_ours:.2f} dB vs RTN {s_rtn:.2f} dB"


def test_report_records_every_layer(calibrated):
    report = json.loads(calibrated["result"].report.read_text())
    for expert in ("high", "low"):
        recs = report["experts"][expert]["layers"]
        assert len(recs) == 20
        for r in recs:
            assert r["sqnr_after_db"] > r["sqnr_rtn_db"]
            assert r["residual"] in ("gptq", "rtn") and r["err_gptq"] is not None
            assert len(r["clip"]) == 2 and all(c in FAST["clip_grid"] for c in r["clip"])
            assert r["alpha"] in FAST["alphas"] and r["rank"] == 8
    assert report["experts"]["high"]["sqnr_after_db_pooled"] > report["experts"]["high"]["sqnr_rtn_db_pooled"] + 3


def test_empty_bin_takes_neighbours_ratio(calibrated):
    layers, _ = fmt.load_state(calibrated["result"].low)
    for name, p in layers.items():
        assert p.clip[1] == p.clip[0], name
    msgs = [r.getMessage() for r in calibrated["logs"] if r.levelno >= logging.WARNING]
    assert any("low expert: timestep bin 1 received no samples" in m and "bin 0" in m for m in msgs), msgs
    report = json.loads(calibrated["result"].report.read_text())
    assert report["experts"]["low"]["empty_bin_fallback"] == {"1": 0}
    assert report["experts"]["low"]["layers"][0]["clip_source"] == ["searched", "bin 0"]


@pytest.mark.slow  # two calibrations
def test_blocks_per_pass_and_lazy_models_give_identical_states(calibrated, tiny_wan_checkpoints, tmp_path):
    """One block per pass, and the experts given as loaders (loaded in turn, dropped after use)."""
    import comfy.sd
    loaded = []

    def loader(expert):
        def load():
            if expert == "low":  # by now the high expert must be gone: one expert in memory at a time
                gc.collect()
                assert loaded[0][1]() is None, "the high expert is still referenced when the low one loads"
            m = comfy.sd.load_diffusion_model(str(tiny_wan_checkpoints[expert]))
            loaded.append((expert, weakref.ref(m.model)))
            return m
        return load

    cfg = CalibrationConfig(**FAST, out_dir=str(tmp_path), blocks_per_pass=1)
    res = calibrate(loader("high"), loader("low"), _items(), cfg)
    assert [e for e, _ in loaded] == ["high", "low"]
    for expert in ("high", "low"):
        a, _ = fmt.load_state(getattr(calibrated["result"], expert))
        b, _ = fmt.load_state(getattr(res, expert))
        assert a.keys() == b.keys()
        for name in a:
            for f in fmt.FIELDS:
                x, y = getattr(a[name], f), getattr(b[name], f)
                assert (x is None and y is None) or torch.equal(x, y), (expert, name, f)


@pytest.mark.slow  # calibrations of their own
@pytest.mark.parametrize("policy", ["per_expert", "global"])
def test_clip_policies_and_keep_list(models, tmp_path, policy):
    cfg = CalibrationConfig(**{**FAST, "alphas": (0.5,)}, clip_policy=policy, keep=(1, "*.ffn.2"),
                            out_dir=str(tmp_path))
    res = calibrate(models["high"], models["low"], _items(1), cfg)
    states = {e: fmt.load_state(getattr(res, e)) for e in ("high", "low")}
    for expert, (layers, meta) in states.items():
        assert meta.clip_policy == policy.replace("_", "-")
        assert sorted(layers) == sorted(f"blocks.0.{n}" for n in ("self_attn.q", "self_attn.k", "self_attn.v",
                                                                   "self_attn.o", "cross_attn.q", "cross_attn.k",
                                                                   "cross_attn.v", "cross_attn.o", "ffn.0"))
        for p in layers.values():
            assert torch.all(p.clip == p.clip[0])
    if policy == "global":
        for name, p in states["high"][0].items():
            assert torch.equal(p.clip, states["low"][0][name].clip)


def test_no_items(models, tmp_path):
    with pytest.raises(CalibrationError, match="no calibration items"):
        calibrate(models["high"], models["low"], [], CalibrationConfig(out_dir=str(tmp_path)))


def test_not_wan(models, tmp_path):
    with pytest.raises(CalibrationError, match="not a ComfyUI MODEL"):
        calibrate(models["high"], object(), _items(1), CalibrationConfig(out_dir=str(tmp_path)))


def test_nan_activations_error_and_no_file(models, tmp_path):
    items = _items(1)
    items[0].latent = items[0].latent.clone()
    items[0].positive[0][1]["concat_latent_image"] = torch.full_like(items[0].positive[0][1]["concat_latent_image"],
                                                                     float("inf"))
    with pytest.raises(CalibrationError, match=r"non-finite activations at the input of blocks\.0\.self_attn\.qkv "
                                               r"\(high expert, bin 0"):
        calibrate(models["high"], models["low"], items, CalibrationConfig(**FAST, out_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("when", ["sampling", "layers"])
def test_cancel_leaves_no_file(models, tmp_path, when):
    polls = []

    def cancel():
        polls.append(1)
        if when == "sampling":
            return len(polls) > 3  # during the high expert's sampling
        if len(polls) > 10:  # into the layers (the first 6 polls are the sampling steps of one item)
            raise KeyboardInterrupt  # what an interrupt callable may raise instead of returning True
        return False

    expected = CalibrationCancelled if when == "sampling" else KeyboardInterrupt
    with pytest.raises(expected):
        calibrate(models["high"], models["low"], _items(1), CalibrationConfig(**FAST, out_dir=str(tmp_path)),
                  cancel=cancel)
    # no state; layers finished before the interrupt are kept in the hidden work folder to resume from
    assert [p.name for p in tmp_path.iterdir()] == ([] if when == "sampling" else [".wan22_i2v.w4a4-work"])
    for name, mod in models["high"].model.diffusion_model.named_modules():
        assert not mod._forward_pre_hooks, name


def test_refuses_to_overwrite(models, tmp_path):
    cfg = CalibrationConfig(**FAST, out_dir=str(tmp_path))
    cfg.state_path("low").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        calibrate(models["high"], models["low"], _items(1), cfg)
    assert cfg.state_path("low").read_bytes() == b"precious"
    assert not cfg.state_path("high").exists()


@pytest.mark.parametrize("bad", [dict(steps=1), dict(boundary=1000), dict(bins=0), dict(alphas=()),
                                 dict(alphas=(1.5,)), dict(clip_grid=(1.2,)), dict(clip_policy="per_layer"),
                                 dict(keep=(-1,)), dict(token_fraction=0), dict(blocks_per_pass=0),
                                 dict(name="a/b"), dict(rank=-1), dict(gptq_damp=0), dict(handover_step=20),
                                 dict(handover_step=0), dict(handover_step=True)])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="CalibrationConfig"):
        CalibrationConfig(**bad)


def test_config_defaults():
    cfg = CalibrationConfig()
    assert cfg.clip_grid == (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    assert cfg.alphas[0] == 0.0 and cfg.alphas[-1] == 1.0 and len(cfg.alphas) == 11
    assert cfg.edges("high") == (1000.0, 975.0, 950.0, 925.0, 900.0)
    assert cfg.edges("low") == (900.0, 675.0, 450.0, 225.0, 0.0)
    assert cfg.shift == 8.0 and cfg.rank == 32 and cfg.clip_policy == "per_bin"
    assert cfg.handover_step is None and cfg.boundary == 900.0  # hand-over by boundary unless asked


@pytest.mark.slow  # calibrations of their own
def test_step_spacing_fills_every_bin(models, tmp_path):
    from wan_w4a4.calibration.config import bin_of, step_edges
    low20 = [888.9, 867.5, 842.1, 811.6, 774.2, 727.3, 666.7, 585.4, 470.6, 296.3]  # 20 steps, shift 8
    edges = step_edges("low", 4, low20)
    assert edges[0] == 900.0 and edges[-1] == 0.0
    counts = [sum(bin_of(t, edges) == b for t in low20) for b in range(4)]
    assert counts == [2, 3, 3, 2]
    assert [sum(bin_of(t, CalibrationConfig().edges("low")) == b for t in low20) for b in range(4)] == [6, 3, 1, 0]

    cfg = CalibrationConfig(**{**FAST, "alphas": (0.5,), "bin_spacing": "steps"}, out_dir=str(tmp_path))
    res = calibrate(models["high"], models["low"], _items(1), cfg)
    report = json.loads(res.report.read_text())
    for expert in ("high", "low"):
        info = report["experts"][expert]
        assert all(r > 0 for r in info["bin_rows"]) and info["empty_bin_fallback"] == {}
        assert list(fmt.read_meta(getattr(res, expert)).bin_edges) == info["bin_edges"]


@pytest.mark.slow  # calibrations of their own
def test_handover_by_step_bins_cover_the_timesteps_each_expert_ran(models, tmp_path):
    """Calibrated with a workflow's hand-over step (4 of 6 at shift 5, where t >= 900 would give 3):
    capture samples with that split, the states record it, and each state's bins cover every timestep
    its expert ran at (the hook's in-range rule: no out-of-range warning for that workflow)."""
    from wan_w4a4.nodes.hook import TimestepBinHook
    from wan_w4a4.nodes.ops import BinSelector

    cfg = CalibrationConfig(**{**FAST, "alphas": (0.5,), "bin_spacing": "steps"}, shift=5.0, handover_step=4,
                            out_dir=str(tmp_path))
    res = calibrate(models["high"], models["low"], _items(1), cfg)
    report = json.loads(res.report.read_text())
    ran = {e: report["experts"][e]["timesteps"] for e in ("high", "low")}
    # ComfyUI's "simple" schedule at shift 5 (sigmas from its 1000-entry table), one call per step (cfg > 1)
    assert [round(t, 1) for t in ran["high"]] == [1000.0, 961.7, 909.2, 833.3]
    assert [round(t, 1) for t in ran["low"]] == [714.9, 500.6]
    for expert in ("high", "low"):
        meta = fmt.read_meta(getattr(res, expert))
        assert meta.handover == {"by": "step", "boundary": pytest.approx((833.333 + 714.897) / 2, abs=1e-2),
                                 "high_steps": 4, "steps": 6, "shift": 5.0, "sampler": "euler",
                                 "scheduler": "simple"}
        hook = TimestepBinHook(expert, meta.bin_edges, BinSelector(meta.num_bins))
        assert all(hook.bin_of(t)[1] for t in ran[expert]), (expert, meta.bin_edges, ran[expert])
        assert report["experts"][expert]["steps"] == len(ran[expert])
        assert report["experts"][expert]["handover"] == meta.handover
