"""The "W4A4 Calibration Set" node and the Calibrate node's calibration_set input, in-process on the tiny
experts, with the mini model's text map (as a CLIP) and linear VAE standing in for umT5 and Wan's VAE."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.comfyui]

FAST = dict(seed=0, runs=1, steps=4, cfg=3.5, shift=8.0, boundary=900.0, bins=2, rank=0,  # noqa: C408
            clip_grid="1.0, 0.8", clip_policy="per_bin", gptq=False, rows_per_bin=16, alphas="0.5")
SIZE = dict(width=64, height=64, length=5)  # noqa: C408 - the set node's widgets


@pytest.fixture(scope="module")
def input_dir(env) -> Path:
    import folder_paths
    path = Path(folder_paths.get_input_directory())
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def two_images(input_dir) -> str:
    folder = input_dir / "cset_two"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("first.png", "second.png"):
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(folder / name)
    (folder / "prompts.txt").write_text("a red square slides left\na blue circle spins\n")
    return "cset_two"


def encoders():
    from wan_w4a4.minimodel import data
    from wan_w4a4.minimodel.text_clip import MiniCLIP
    return MiniCLIP(), data.LinearVideoVAE()


def build(env, folder, **kw):
    clip, vae = encoders()
    args = {**SIZE, "negative": "", "seed": 5, **kw}
    return env.node("WanW4A4CalibrationSet").build(clip, vae, folder, **args)


def test_node_is_registered_with_the_pack(env):
    W4A4CalibrationSet = env.nodes.NODE_CLASS_MAPPINGS["WanW4A4CalibrationSet"]  # the pack as ComfyUI loaded it
    assert W4A4CalibrationSet.__module__.endswith(".nodes.calibration_set_node")
    assert env.nodes.NODE_DISPLAY_NAME_MAPPINGS["WanW4A4CalibrationSet"] == "W4A4 Calibration Set"
    assert W4A4CalibrationSet.CATEGORY == env.node("WanW4A4Calibrate").CATEGORY
    spec = W4A4CalibrationSet.INPUT_TYPES()
    assert all(cfg[1].get("tooltip") for part in spec.values() for cfg in part.values())
    assert W4A4CalibrationSet.RETURN_TYPES[0] == "W4A4_CALIBRATION_SET"


def test_calibrate_inputs_keep_saved_workflows_valid(env):
    """calibration_set is the last optional socket; positive/negative/latent are optional now but keep
    their slot order after the two models, and the widgets (all that widgets_values holds) keep theirs:
    a new widget (gpu_budget_gib) comes after all earlier ones, so a workflow saved before it maps
    every value it has to the same widget and the new one takes its default."""
    spec = env.node("WanW4A4Calibrate").INPUT_TYPES()
    optional = list(spec["optional"])
    assert spec["optional"]["calibration_set"][0] == "W4A4_CALIBRATION_SET"
    assert optional[-2:] == ["calibration_set", "gpu_budget_gib"]
    widget = ("INT", "FLOAT", "STRING", "BOOLEAN")
    names = [*spec["required"], *optional]
    slots = [n for n in names if not isinstance(spec["required"].get(n, spec["optional"].get(n))[0], list)
             and spec["required"].get(n, spec["optional"].get(n))[0] not in widget]
    assert slots == ["model_high", "model_low", "positive", "negative", "latent", "calibration_set"]
    wf = json.loads((Path(__file__).resolve().parents[2] / "example_workflows" / "wan22_i2v_w4a4_calibrate.json")
                    .read_text())
    (node,) = [n for n in wf["nodes"] if n["type"] == "WanW4A4Calibrate"]
    assert [i["name"] for i in node["inputs"]] == slots[:5]
    widgets = [n for n in names if n not in slots]
    assert widgets[:3] == ["seed", "runs", "steps"] and widgets[-3:] == ["sampler_name", "scheduler", "gpu_budget_gib"]
    assert len(node["widgets_values"]) == len(widgets) + 1  # + the seed's control_after_generate


@pytest.mark.slow
def test_set_of_two_images_calibrates_in_one_run(env, two_images, caplog):
    out = build(env, two_images)
    items, text = out["result"]
    assert [it.seed for it in items] == [5, 6] and "2 items" in text and "first.png (seed 5)" in text
    for it in items:
        assert it.latent.shape == (1, 16, 2, 8, 8) and it.positive[0][0].shape == (1, 32, 4096)
    assert not torch.equal(items[0].positive[0][0], items[1].positive[0][0])

    node = env.node("WanW4A4Calibrate")
    with caplog.at_level(logging.INFO):
        result = node.calibrate(env.unet("high"), env.unet("low"), name="cset_node", overwrite=True,
                                calibration_set=items, **FAST)
    assert "calibrated on 2 item(s) of the calibration set" in result["result"][2]
    assert not [r for r in caplog.records if "calibrating on the calibration_set" in r.getMessage()]
    report = json.loads((env.w4a4_dir / "cset_node_report.json").read_text())
    for expert, d in report["experts"].items():  # one sampling call per item and step
        assert len(d["timesteps"]) == 2 * d["steps"], (expert, d["timesteps"])
    for expert in ("high", "low"):
        assert (env.w4a4_dir / f"cset_node_{expert}.safetensors").is_file()

    # Both connected: the set is used (runs=3 would give 3 runs of the single item), and the log says so.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = node.calibrate(env.unet("high"), env.unet("low"), env.positive, env.negative, env.latent,
                                name="cset_both", overwrite=True, calibration_set=items, **{**FAST, "runs": 3})
    assert "calibrated on 2 item(s) of the calibration set" in result["result"][2]
    assert [r for r in caplog.records if "calibrating on the calibration_set" in r.getMessage()]


def test_calibrate_without_images_or_set_says_what_to_connect(env):
    with pytest.raises(ValueError, match="connect latent .* or a calibration_set"):
        env.node("WanW4A4Calibrate").calibrate(env.unet("high"), env.unet("low"), env.positive, env.negative,
                                               name="cset_none", overwrite=True, **FAST)
    assert not list(env.w4a4_dir.glob("cset_none*"))


def test_prompts_text_overrides_the_folders_file(env, two_images):
    items, text = build(env, two_images, prompts='{"image": "second.png", "prompt": "a green star", "seed": 9}')["result"]
    assert len(items) == 1 and items[0].seed == 9 and "second.png (seed 9): a green star" in text
    (ref,) = env.nodes.CLIPTextEncode().encode(encoders()[0], "a green star")
    assert torch.equal(items[0].positive[0][0], ref[0][0])


@pytest.mark.parametrize("folder,message", [
    ("../outside", "is not inside"),
    ("/tmp", "is not inside"),
    ("cset_link", "resolves outside"),
    ("cset_missing", "does not exist"),
    ("cset_two/first.png", "is not a folder"),
])
def test_folder_must_stay_in_the_input_directory(env, input_dir, two_images, tmp_path, folder, message):
    link = input_dir / "cset_link"
    if not link.is_symlink():
        link.symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError) as e:  # the pack's CalibrationSetError, as ComfyUI loaded the pack
        build(env, folder)
    assert type(e.value).__name__ == "CalibrationSetError" and str(e.value).startswith("W4A4 Calibration Set: folder") and message in str(e.value), e.value


def test_changed_folder_reruns_the_node(env, input_dir, two_images):
    node_cls = env.nodes.NODE_CLASS_MAPPINGS["WanW4A4CalibrationSet"]
    before = node_cls.IS_CHANGED(folder=two_images)
    assert node_cls.IS_CHANGED(folder=two_images) == before
    prompts = input_dir / two_images / "prompts.txt"
    text = prompts.read_text()
    prompts.write_text(text.replace("spins", "spins fast"))
    try:
        assert node_cls.IS_CHANGED(folder=two_images) != before
    finally:
        prompts.write_text(text)
    assert node_cls.IS_CHANGED(folder="../nope") != node_cls.IS_CHANGED(folder="../nope")  # NaN: always runs
