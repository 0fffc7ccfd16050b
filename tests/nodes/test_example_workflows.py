"""The 14B example workflows against each other and against the running ComfyUI (in-process, CPU):
the 14B workflow is the official template's sampling in W4A4 with the 4-step LoRA path, it declares
the model files it uses, and the states it names, made as the calibrate workflow makes them, have bins
that cover every timestep each expert runs at in either of its paths. (tests/nodes/test_server.py
checks every workflow's nodes and links against the server's /object_info.)"""
from __future__ import annotations

import json

import pytest
import torch

from wan_w4a4.calibration import capture as C
from wan_w4a4.calibration.config import CalibrationConfig
from wan_w4a4.nodes.hook import TimestepBinHook
from wan_w4a4.nodes.ops import BinSelector
from wan_w4a4.apps.runtime import REPO_ROOT

pytestmark = pytest.mark.comfyui

WORKFLOWS = REPO_ROOT / "example_workflows"
# What each loader's file widget is and where the frontend's "Missing Models" dialog looks for it.
FILE_WIDGET = {"UNETLoader": ("unet_name", "diffusion_models"), "CLIPLoader": ("clip_name", "text_encoders"),
               "VAELoader": ("vae_name", "vae"), "LoraLoaderModelOnly": ("lora_name", "loras"),
               "WanW4A4ApplyState": ("state_name", "w4a4")}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def widgets(env, node: dict) -> dict:
    """A UI node's widget values by input name, in the order the node class declares its inputs."""
    spec = env.nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
    values, out = list(node["widgets_values"]), {}
    for name, cfg in [*spec["required"].items(), *spec.get("optional", {}).items()]:
        if not values:
            break
        if isinstance(cfg[0], list) or cfg[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            out[name] = values.pop(0)
            if name in ("seed", "noise_seed"):
                values.pop(0)  # the frontend's control_after_generate value
    return out


def sampler_pairs(env, wf: dict) -> dict[int, tuple[dict, dict]]:
    """mode -> (high, low) KSamplerAdvanced widgets, told apart by add_noise (only the high one adds it)."""
    pairs: dict[int, dict] = {}
    for n in wf["nodes"]:
        if n["type"] == "KSamplerAdvanced":
            w = widgets(env, n)
            pairs.setdefault(n.get("mode", 0), {})["high" if w["add_noise"] == "enable" else "low"] = w
    return {mode: (p["high"], p["low"]) for mode, p in pairs.items()}


def upstream(wf: dict, node_id: int) -> list[str]:
    """Node types feeding a node's model input, nearest first."""
    nodes, links = {n["id"]: n for n in wf["nodes"]}, {l[0]: l for l in wf["links"]}
    chain, n = [], nodes[node_id]
    while True:
        model_in = [i for i in n.get("inputs", []) if i["type"] == "MODEL" and i.get("link") is not None]
        if not model_in:
            return chain
        n = nodes[links[model_in[0]["link"]][1]]
        chain.append(n["type"])


def test_14b_workflow_follows_the_template_in_w4a4(env):
    wf = load("wan22_i2v_14b_w4a4.json")
    by_type = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    assert not {"ComfySwitchNode", "ComfyMathExpression"} & set(by_type)  # 0.3.64 has neither: a flat graph
    pairs = sampler_pairs(env, wf)
    assert set(pairs) == {0, 4}  # the 4-step LoRA path active, the original 20 steps bypassed
    for mode, (steps, cfg, split) in ((0, (4, 1.0, 2)), (4, (20, 3.5, 10))):
        high, low = pairs[mode]
        assert (high["steps"], high["cfg"], high["start_at_step"], high["end_at_step"]) == (steps, cfg, 0, split)
        assert (low["steps"], low["cfg"], low["start_at_step"], low["end_at_step"]) == (steps, cfg, split, steps)
        assert {(w["sampler_name"], w["scheduler"]) for w in (high, low)} == {("euler", "simple")}
        assert high["return_with_leftover_noise"] == "enable" and low["return_with_leftover_noise"] == "disable"
    for n in by_type["KSamplerAdvanced"]:
        chain = upstream(wf, n["id"])
        lora = ["LoraLoaderModelOnly"] if n.get("mode", 0) == 0 else []
        assert chain == ["ModelSamplingSD3", *lora, "WanW4A4ApplyState", "UNETLoader"], (n["id"], chain)
    assert {widgets(env, n)["shift"] for n in by_type["ModelSamplingSD3"]} == {5.0}
    assert sorted(widgets(env, n)["lora_name"] for n in by_type["LoraLoaderModelOnly"]) == [
        f"wan2.2_i2v_lightx2v_4steps_lora_v1_{e}_noise.safetensors" for e in ("high", "low")]
    assert [(w["width"], w["height"], w["length"]) for w in (widgets(env, n) for n in by_type["WanImageToVideo"])] \
        == [(640, 640, 81)]
    assert {widgets(env, n)["fps"] for n in by_type["CreateVideo"]} == {16}
    assert {widgets(env, n)["filename_prefix"] for n in by_type["SaveVideo"]} == {"video/Wan2.2_i2v"}
    assert [widgets(env, n)["image"] for n in by_type["LoadImage"]] == ["wan_w4a4_start_640.jpg"]
    assert [widgets(env, n)["clip_name"] for n in by_type["CLIPLoader"]] == [
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors"]
    assert [widgets(env, n)["vae_name"] for n in by_type["VAELoader"]] == ["wan_2.1_vae.safetensors"]
    notes = " ".join(v for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote") for v in n["widgets_values"])
    assert "not supported" not in notes and "--handover-step 10" in notes


def test_14b_workflow_declares_the_model_files_it_uses(env):
    """properties.models on every loader, as the official template has them: what the frontend's
    Missing Models dialog lists. The W4A4 states have no download (they are made by calibration)."""
    for n in load("wan22_i2v_14b_w4a4.json")["nodes"]:
        if n["type"] not in FILE_WIDGET:
            assert "models" not in n.get("properties", {}), n["id"]
            continue
        widget, directory = FILE_WIDGET[n["type"]]
        (m,) = n["properties"]["models"]
        assert (m["name"], m["directory"]) == (widgets(env, n)[widget], directory), n["id"]
        if directory == "w4a4":
            assert "url" not in m
        else:
            assert m["url"].startswith("https://huggingface.co/Comfy-Org/") and m["url"].endswith("/" + m["name"])


def test_states_of_the_calibrate_workflow_cover_every_step_of_the_14b_workflow(env):
    """The 14B workflow names the states the calibrate workflow writes, and that calibration's hand-over
    (the calibration's own schedule and edge functions) gives bins that hold every timestep each expert
    runs at in both of the 14B workflow's paths: no out-of-range step."""
    from wan_w4a4.nodes.calibrate_node import handover_step_of
    calib_wf = load("wan22_i2v_w4a4_calibrate.json")
    (node,) = [n for n in calib_wf["nodes"] if n["type"] == "WanW4A4Calibrate"]
    c = widgets(env, node)
    cfg = CalibrationConfig(steps=c["steps"], cfg=c["cfg"], shift=c["shift"], boundary=c["boundary"], bins=c["bins"],
                            sampler=c["sampler_name"], scheduler=c["scheduler"],
                            handover_step=handover_step_of(c["handover"], c["handover_step"]))
    # the calibrate workflow samples with the hand-over it calibrates for
    (c_high, c_low) = sampler_pairs(env, calib_wf)[0]
    assert (cfg.handover_step, cfg.steps, cfg.shift) == (c_high["end_at_step"], c_high["steps"], 5.0)

    wf = load("wan22_i2v_14b_w4a4.json")
    states = {widgets(env, n)["state_name"] for n in wf["nodes"] if n["type"] == "WanW4A4ApplyState"}
    assert states == {f"{c['name']}_high.safetensors", f"{c['name']}_low.safetensors"}

    model = env.unet("high")
    _, ts = C.schedule(C.with_shift(model, cfg.shift), cfg)
    switch, boundary = C.handover(ts, cfg)
    hooks = {e: TimestepBinHook(e, cfg.edges(e, run.tolist(), boundary), BinSelector(cfg.bins))
             for e, run in (("high", ts[:switch]), ("low", ts[switch:]))}
    import comfy.samplers
    (shifted,) = env.nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]().patch(model, 5.0)
    ms = shifted.get_model_object("model_sampling")
    for mode, (high, low) in sampler_pairs(env, wf).items():
        sigmas = comfy.samplers.calculate_sigmas(ms, high["scheduler"], high["steps"])[:-1]
        run = [float(t) for t in ms.timestep(sigmas)]
        split = high["end_at_step"]
        for expert, part in (("high", run[:split]), ("low", run[split:])):
            assert all(hooks[expert].bin_of(t)[1] for t in part), (mode, expert, part, hooks[expert].edges)
    # ... which states calibrated for the default expert switch (t >= 900) would not do
    default = TimestepBinHook("high", cfg.edges("high"), BinSelector(cfg.bins))
    assert not default.bin_of(float(torch.tensor(859.375)))[1]
