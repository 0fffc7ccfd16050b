"""The benchmark's fp8_scaled experts: the streamed file is the one tests/fp8_scaled_lib.py makes from the
same BF16 tensors (ComfyUI's layout), and calibration timing reads it as an fp8_scaled source."""
from __future__ import annotations

import pytest
import torch
from fp8_scaled_lib import fp8_scaled_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from test_bench_e2e import _bench


def _args(tmp_path, comfyui, *extra):
    cli = _bench("cli")
    return cli.parse_args(["--arch", "tiny", "--cpu", "--config", "none", "--calibrate", "--workdir", str(tmp_path),
                           "--comfyui", str(comfyui), "--steps", "2", "--text-tokens", "16",
                           "--calib-items", "1", "--calib-steps", "2", "--calib-blocks", "1", *extra])


@pytest.mark.comfyui
def test_streamed_fp8_scaled_file_is_comfyuis_layout(comfyui, tmp_path):
    weights, common = _bench("weights"), _bench("common")
    args = _args(tmp_path, comfyui, "--calib-source", "fp8_scaled")
    out = weights.generate_files(args, True, False, False, True)
    assert out["bf16_generated"] and out["fp8_scaled_generated"]
    files = tmp_path / "comfy_base" / "models" / "diffusion_models"
    names = common.file_names(args)
    want = fp8_scaled_state_dict(load_file(str(files / names["bf16"])))
    got = load_file(str(files / names["fp8_scaled"]))
    assert list(got) == list(want)  # file order too: marker, then each tensor followed by its scales
    for key, t in want.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        assert torch.equal(got[key].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got[key],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), key
    with safe_open(str(files / names["fp8_scaled"]), "pt") as f:  # the tag that makes a later run reuse it
        assert f.metadata()["bench"] == common.BENCH_TAG
    again = weights.generate_files(args, True, False, False, True)
    assert not again["bf16_generated"] and not again["fp8_scaled_generated"]


@pytest.mark.comfyui
@pytest.mark.slow
def test_calibration_timing_reads_the_fp8_scaled_file(comfy_nodes, comfyui, comfy_base_dir, tmp_path):
    weights, calib = _bench("weights"), _bench("calib")
    from wan_w4a4.apps import runtime
    from wan_w4a4.kernels import format as fmt
    args = _args(tmp_path, comfyui, "--calib-source", "fp8_scaled")
    weights.generate_files(args, False, False, False, True)
    try:  # the benchmark points this process's ComfyUI at its own work folder
        out = calib.run_calibration(args)
    finally:
        runtime.set_base_directory(comfy_base_dir)
    assert out["source"] == "fp8_scaled" and out["experts"]["high"]["layers"] > 0, out
    states = sorted((tmp_path / "calibration").glob("*.safetensors"))
    assert states, list((tmp_path / "calibration").iterdir())
    for path in states:
        assert fmt.read_meta(path).source["kind"] == "fp8_scaled", path


def test_fp8_source_needs_a_file(tmp_path, capsys):
    cli = _bench("cli")
    with pytest.raises(SystemExit):
        cli.parse_args(["--arch", "tiny", "--config", "none", "--calibrate", "--source", "memory",
                        "--calib-source", "fp8_scaled", "--workdir", str(tmp_path)])
    assert "--calib-source fp8_scaled" in capsys.readouterr().err
