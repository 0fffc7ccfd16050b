"""Calibration sets (calibration/dataset.py): parsing and its errors (no ComfyUI), the encoding through
ComfyUI's own nodes with the mini model's stand-ins for umT5 and Wan's VAE, and ``calibrate --set``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wan_w4a4.calibration import dataset as ds
from wan_w4a4.kernels import format as fmt

REPO = Path(__file__).resolve().parents[2]


def write_image(path: Path, seed: int, size=(40, 56), mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 4), dtype=np.uint8), "RGBA").convert(mode).save(path)
    return path


def make_set(folder: Path, names=("b.png", "a.jpg", "c.webp"), prompts=None, jsonl=None) -> Path:
    for i, n in enumerate(names):
        write_image(folder / n, i)
    if jsonl is not None:
        (folder / "prompts.jsonl").write_text("".join(line + "\n" for line in jsonl), encoding="utf-8")
    else:
        prompts = prompts if prompts is not None else [f"prompt {i}" for i in range(len(names))]
        (folder / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return folder


# --- parsing -----------------------------------------------------------------------------------

def test_default_negative_is_the_official_templates():
    wf = json.loads((REPO / "example_workflows" / "wan22_i2v_14b_w4a4.json").read_text(encoding="utf-8"))
    (node,) = [n for n in wf["nodes"] if n.get("title") == "CLIP Text Encode (Negative Prompt)"]
    assert node["widgets_values"][0] == ds.WAN_NEGATIVE


def test_txt_matches_prompts_to_images_in_sorted_name_order(tmp_path):
    folder = make_set(tmp_path / "s", prompts=["for a", "for b", "for c"])
    (folder / "notes.md").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    cset = ds.load_set(folder, seed=10)
    assert [(e.image.name, e.prompt, e.seed) for e in cset.entries] == [
        ("a.jpg", "for a", 10), ("b.png", "for b", 11), ("c.webp", "for c", 12)]
    assert all(e.negative == ds.WAN_NEGATIVE for e in cset.entries) and len(cset) == 3
    assert cset.entries[1].where == f"{folder / 'prompts.txt'}, line 2"
    assert [e.negative for e in ds.load_set(folder, negative="").entries] == ["", "", ""]


def test_txt_trailing_blank_lines_are_ignored(tmp_path):
    folder = make_set(tmp_path / "s", names=("a.png",), prompts=["only one", "", "  "])
    assert [e.prompt for e in ds.load_set(folder).entries] == ["only one"]


@pytest.mark.parametrize("prompts,message", [
    (["one", "two"], "2 prompts for 3 images (a.jpg, b.png, c.webp)"),
    (["one", "", "three"], "line 2: empty prompt"),
    (["one", "two", "three", "four"], "4 prompts for 3 images"),
])
def test_txt_errors_name_the_file_and_line(tmp_path, prompts, message):
    folder = make_set(tmp_path / "s", prompts=prompts)
    with pytest.raises(ds.CalibrationSetError) as e:
        ds.load_set(folder)
    assert str(folder / "prompts.txt") in str(e.value) and message in str(e.value), e.value


def test_jsonl_fills_what_each_line_leaves_out(tmp_path):
    folder = make_set(tmp_path / "s", names=("a.png", "b.png", "sub/c.png"), jsonl=[
        json.dumps({"image": "b.png", "prompt": "bee", "negative": "blurry", "seed": 99}),
        "",
        json.dumps({"image": "sub/c.png", "prompt": "  sea  "}),
    ])
    cset = ds.load_set(folder, negative="default neg", seed=5)
    assert [(e.image.relative_to(folder).as_posix(), e.prompt, e.negative, e.seed) for e in cset.entries] == [
        ("b.png", "bee", "blurry", 99), ("sub/c.png", "sea", "default neg", 6)]
    assert cset.entries[1].where.endswith("prompts.jsonl, line 3")


BAD_JSONL = [
    ('{"image": "a.png", "prompt": "x", "steps": 3}', "line 1: unknown key(s) 'steps'"),
    ('{"image": "missing.png", "prompt": "x"}', "line 1: image: 'missing.png' does not exist in"),
    ('{"image": "a.png", "prompt": "x"}\n{"image": "./a.png", "prompt": "y"}',
     "line 2: image './a.png' is already used by line 1"),
    ('{"image": "a.png", "prompt": "   "}', "line 1: empty prompt"),
    ('{"image": "a.png"}', "line 1: missing \"prompt\""),
    ('{"image": "../outside.png", "prompt": "x"}', "line 1: image: '../outside.png' is not inside"),
    ('{"image": "/etc/passwd", "prompt": "x"}', "line 1: image: '/etc/passwd' is not inside"),
    ('{"image": "link.png", "prompt": "x"}', "line 1: image: 'link.png' resolves outside"),
    ('{"image": "a.png", "prompt": "x",}', "line 1: not valid JSON"),
    ('["a.png", "x"]', "line 1: expected a JSON object"),
    ('{"image": "a.png", "prompt": "x", "seed": true}', "line 1: \"seed\" must be an integer"),
    ('{"image": "a.png", "prompt": "x", "seed": -1}', "line 1: \"seed\" must be an integer"),
    ('{"image": "a.png", "prompt": "x", "negative": 3}', "line 1: \"negative\" must be a string"),
    ('{"image": "notes.txt", "prompt": "x"}', "line 1: image 'notes.txt' is not a .png/.jpg/.jpeg/.webp file"),
    ('\n\n', "no items"),
]


@pytest.mark.parametrize("text,message", BAD_JSONL, ids=[m for _, m in BAD_JSONL])
def test_jsonl_errors_name_the_file_and_line(tmp_path, text, message):
    folder = make_set(tmp_path / "s", names=("a.png",), jsonl=[])
    (folder / "prompts.jsonl").write_text(text, encoding="utf-8")
    write_image(tmp_path / "outside.png", 7)
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    (folder / "notes.txt").write_text("x")
    with pytest.raises(ds.CalibrationSetError) as e:
        ds.load_set(folder)
    assert str(folder / "prompts.jsonl") in str(e.value) and message in str(e.value), e.value


def test_folder_and_prompts_file_errors(tmp_path):
    with pytest.raises(ds.CalibrationSetError, match="no such folder"):
        ds.load_set(tmp_path / "nope")
    folder = make_set(tmp_path / "s", names=("a.png",), prompts=["x"])
    (folder / "prompts.jsonl").write_text('{"image": "a.png", "prompt": "x"}\n')
    with pytest.raises(ds.CalibrationSetError, match="both prompts.txt and prompts.jsonl; keep one"):
        ds.load_set(folder)
    (folder / "prompts.txt").unlink()
    (folder / "prompts.jsonl").unlink()
    with pytest.raises(ds.CalibrationSetError, match="no prompts.txt or prompts.jsonl"):
        ds.load_set(folder)
    (folder / "prompts.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ds.CalibrationSetError, match=r"prompts.txt: not UTF-8 text"):
        ds.load_set(folder)


def test_prompts_text_overrides_the_folders_file(tmp_path):
    folder = make_set(tmp_path / "s", names=("a.png", "b.png"), prompts=["file a", "file b"])
    assert [e.prompt for e in ds.load_set(folder, prompts_text="typed a\ntyped b").entries] == ["typed a", "typed b"]
    cset = ds.load_set(folder, prompts_text='\n{"image": "b.png", "prompt": "only b", "seed": 4}\n')
    assert [(e.image.name, e.prompt, e.seed) for e in cset.entries] == [("b.png", "only b", 4)]
    assert cset.source == "prompts text"
    with pytest.raises(ds.CalibrationSetError, match=r"prompts text \(for .*\): 1 prompts for 2 images"):
        ds.load_set(folder, prompts_text="just one")
    assert [e.prompt for e in ds.load_set(folder, prompts_text="  \n").entries] == ["file a", "file b"]


def test_check_images_names_the_broken_file(tmp_path):
    folder = make_set(tmp_path / "s", names=("a.png", "b.png"))
    ds.check_images(ds.load_set(folder))
    good = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(good[: len(good) // 2])  # truncated
    cset = ds.load_set(folder)
    with pytest.raises(ds.CalibrationSetError) as e:
        ds.check_images(cset)
    assert f"{folder / 'b.png'} ({folder / 'prompts.txt'}, line 2): not a readable image" in str(e.value)


@pytest.mark.parametrize("kw,message", [
    ({"width": 100, "height": 64, "length": 5}, "width must be a positive multiple of 16, got 100"),
    ({"width": 64, "height": 0, "length": 5}, "height must be a positive multiple of 16, got 0"),
    ({"width": 64, "height": 64, "length": 6}, "length (frames) must be 1 + 4k"),
])
def test_encode_size_is_validated(kw, message):
    with pytest.raises(ds.CalibrationSetError) as e:
        ds.EncodeSize(**kw)
    assert message in str(e.value)


# --- encoding through ComfyUI's nodes ---------------------------------------------------------

@pytest.fixture
def input_dir(comfy_nodes):
    import folder_paths
    path = Path(folder_paths.get_input_directory())
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.comfyui
def test_encode_set_equals_the_template_nodes_one_by_one(comfy_nodes, input_dir):
    """Each item equals what LoadImage -> CLIPTextEncode (x2) -> WanImageToVideo give for its pair, with
    the mini model's text map (as a CLIP) and linear VAE; and the MiniCLIP behind CLIPTextEncode gives
    exactly what the pack's 'Mini text encode' node gives."""
    from comfy_extras.nodes_wan import WanImageToVideo
    from wan_w4a4.minimodel import data
    from wan_w4a4.minimodel.text_clip import MiniCLIP
    from wan_w4a4.nodes.mini_nodes import MiniTextEncode

    folder = make_set(input_dir / "ds_encode", names=("a.png", "b.jpg"), jsonl=[
        json.dumps({"image": "b.jpg", "prompt": "a red square slides left", "seed": 11}),
        json.dumps({"image": "a.png", "prompt": "a blue circle spins", "negative": "static"}),
    ])
    cset = ds.load_set(folder, negative="", seed=3)
    clip, vae, size = MiniCLIP(), data.LinearVideoVAE(), ds.EncodeSize(width=64, height=48, length=9)
    seen = []
    items = ds.encode_set(cset, clip, vae, size, progress=lambda d, t, w: seen.append((d, t, w)))
    assert seen == [(1, 2, "b.jpg"), (2, 2, "a.png")]
    assert [it.seed for it in items] == [11, 4]
    for it, e in zip(items, cset.entries):
        assert it.latent.shape == (1, 16, 3, 6, 8)
        (ctx, extra), = it.positive
        assert ctx.shape == (1, 32, 4096)
        assert extra["concat_latent_image"].shape == (1, 16, 3, 6, 8) and extra["concat_mask"].shape == (1, 1, 3, 6, 8)
        # one by one, as the template graph wires them
        (image, _mask) = comfy_nodes.LoadImage().load_image(f"ds_encode/{e.image.name}")
        (pos,) = comfy_nodes.CLIPTextEncode().encode(clip, e.prompt)
        (neg,) = comfy_nodes.CLIPTextEncode().encode(clip, e.negative)
        (mini_pos,) = MiniTextEncode().encode(e.prompt)
        assert torch.equal(pos[0][0], mini_pos[0][0])
        ref = WanImageToVideo.execute(positive=pos, negative=neg, vae=vae, width=64, height=48, length=9,
                                      batch_size=1, start_image=image)
        ref_pos, ref_neg, ref_latent = ref.result if hasattr(ref, "result") else ref
        assert torch.equal(it.latent, ref_latent["samples"])
        for got, want in ((it.positive, ref_pos), (it.negative, ref_neg)):
            assert torch.equal(got[0][0], want[0][0])
            for key in ("concat_latent_image", "concat_mask"):
                assert torch.equal(got[0][1][key], want[0][1][key]), key
    # different images and prompts give different items; the negative of the first is the set's default ""
    assert not torch.equal(items[0].positive[0][1]["concat_latent_image"],
                           items[1].positive[0][1]["concat_latent_image"])
    (empty,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
    assert torch.equal(items[0].negative[0][0], empty[0][0])
    assert not torch.equal(items[1].negative[0][0], empty[0][0])


@pytest.mark.comfyui
def test_encode_set_refuses_images_outside_the_input_directory(comfy_nodes, tmp_path):
    from wan_w4a4.minimodel import data
    from wan_w4a4.minimodel.text_clip import MiniCLIP

    cset = ds.load_set(make_set(tmp_path / "elsewhere", names=("a.png",)))
    with pytest.raises(ds.CalibrationSetError, match="not inside ComfyUI's input directory"):
        ds.encode_set(cset, MiniCLIP(), data.LinearVideoVAE(), ds.EncodeSize(32, 32, 5))


@pytest.mark.comfyui
def test_loader_node_reads_the_given_file_not_a_same_named_one(comfy_nodes, comfy_base_dir, tmp_path):
    """--text-encoder / --vae go through ComfyUI's loader nodes, which take a name in a model folder:
    the given file's folder goes first, so a same-named file in models/vae is not the one read."""
    from wan_w4a4.apps.calibrate import _load_by_node

    class NameOnly:  # a loader node that returns the path ComfyUI resolves the name to
        FUNCTION = "load"

        def load(self, vae_name):
            import folder_paths
            return (folder_paths.get_full_path("vae", vae_name),)

    for folder in (comfy_base_dir / "models" / "vae", tmp_path / "mine"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "wan_vae.safetensors").write_bytes(b"x")
    got = _load_by_node(NameOnly, "vae", tmp_path / "mine" / "wan_vae.safetensors", "vae_name")
    assert Path(got).resolve() == (tmp_path / "mine" / "wan_vae.safetensors").resolve()


# --- the command line --------------------------------------------------------------------------

FAST = ["--steps", "4", "--bins", "2", "--rank", "0", "--alphas", "0.5", "--clip-grid", "1,0.8",
        "--rows-per-bin", "16", "--cpu", "--width", "32", "--height", "32", "--frames", "5"]


def test_cli_checks_the_set_before_loading_anything(tmp_path, capsys):
    """In-process, without ComfyUI: every one of these stops before ComfyUI starts."""
    from wan_w4a4.__main__ import main

    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(b"")
    base = ["calibrate", "--high", str(ck), "--low", str(ck), "--out", str(tmp_path / "out")]
    folder = make_set(tmp_path / "s", names=("a.png", "b.png"), prompts=["one", "two"])
    assert main([*base, "--set", str(folder)]) == 2
    assert "--set needs --text-encoder" in capsys.readouterr().err
    enc = tmp_path / "umt5.pt"
    enc.write_bytes(b"pickle")
    assert main([*base, "--set", str(folder), "--text-encoder", str(enc), "--vae", str(enc)]) == 2
    assert "not a .safetensors file" in capsys.readouterr().err
    bad = tmp_path / "umt5.safetensors"
    bad.write_bytes(b"\xff" * 64)
    assert main([*base, "--set", str(folder), "--text-encoder", str(bad), "--vae", str(bad)]) == 2
    assert f"--text-encoder {bad}: not a valid safetensors file" in capsys.readouterr().err
    assert main([*base, "--set", str(folder), "--source", "minimodel", "--vae", str(bad)]) == 2
    assert "--vae: not used with --source minimodel" in capsys.readouterr().err
    (folder / "prompts.txt").write_text("one\n")
    assert main([*base, "--set", str(folder), "--source", "minimodel"]) == 2
    assert "1 prompts for 2 images" in capsys.readouterr().err
    (folder / "prompts.txt").write_text("one\ntwo\n")
    (folder / "b.png").write_bytes(b"\x89PNG broken")
    assert main([*base, "--set", str(folder), "--source", "minimodel"]) == 2
    assert "b.png (" in capsys.readouterr().err
    assert main([*base, "--negative", "x"]) == 2
    assert "are for --set" in capsys.readouterr().err
    assert main([*base, "--set", str(folder), "--source", "minimodel", "--width", "40"]) == 2
    assert "width must be a positive multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.comfyui
@pytest.mark.slow
def test_cli_calibrates_on_every_item_of_a_set(comfyui, tiny_wan_checkpoints, tmp_path):
    ck = tiny_wan_checkpoints
    folder = make_set(tmp_path / "set", names=("a.png", "b.jpg", "c.webp"),
                      prompts=["a red square slides left", "a blue circle spins", "a green star grows"])
    env = dict(os.environ, COMFYUI_PATH=str(comfyui), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "wan_w4a4", "calibrate", "--high", str(ck["high"]), "--low",
                          str(ck["low"]), "--out", str(tmp_path / "out"), "--name", "cset", "--set", str(folder),
                          "--source", "minimodel", "--handover-step", "2", *FAST],
                         check=False, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"calibration set {folder / 'prompts.txt'}: 3 items" in out.stdout
    assert "encode set: 100%" in out.stderr  # the encoding's tqdm bar
    for expert in ("high", "low"):
        layers, meta = fmt.load_state(tmp_path / "out" / f"cset_{expert}.safetensors")
        assert len(layers) == 20 and meta.expert == expert
    report = json.loads((tmp_path / "out" / "cset_report.json").read_text())
    for expert, d in report["experts"].items():
        # one sampling call per item and step (cond and uncond batched): 3 items x 2 steps per expert
        assert d["steps"] == 2 and len(d["timesteps"]) == 3 * 2, (expert, d["timesteps"])
