"""Calibration from BF16/FP16 experts and from ComfyUI's fp8_scaled ones: dequantization, the source a state
records, and refusals before any work (through the real ComfyUI, CPU)."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from fp8_scaled_lib import dequantized, write_fp8_scaled
from wan_w4a4.calibration import (
    CalibrationConfig,
    CalibrationError,
    calibrate,
    synthetic_items,
)
from wan_w4a4.calibration import capture as C
from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm
from wan_w4a4.minimodel.arch import quantizable_linears

FAST = {"steps": 6, "bins": 2, "rank": 8, "alphas": (0.25, 0.5, 0.75), "clip_grid": (1.0, 0.9, 0.8, 0.7),
        "rows_per_bin": 64}


def _items(n=1):
    return synthetic_items(n, frames=5, height=32, width=32, text_tokens=8)


@pytest.fixture(scope="module")
def files(comfy_nodes, tiny_wan_checkpoints, tmp_path_factory):
    """The tiny BF16 experts and their fp8_scaled versions: {(source, expert): path}."""
    out = tmp_path_factory.mktemp("fp8_scaled")
    paths = {}
    for expert in ("high", "low"):
        src = tiny_wan_checkpoints[expert]
        paths["bf16", expert] = src
        paths["fp8_scaled", expert] = write_fp8_scaled(src, out / f"{src.stem}_fp8_scaled.safetensors")
    return paths


def _load(path, **options):
    """Loaded in inference mode, as ComfyUI's UNETLoader node is (ComfyUI runs every node in it)."""
    import comfy.sd
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path), model_options=options)


@pytest.fixture(scope="module")
def fp8_models(files):
    return {e: _load(files["fp8_scaled", e]) for e in ("high", "low")}


@pytest.fixture(scope="module")
def names(tiny_wan_checkpoints):
    return quantizable_linears(tiny_wan_checkpoints["arch"])


pytestmark = pytest.mark.comfyui


# --- dequantization ------------------------------------------------------------------------------

def test_fp8_scaled_weights_are_dequantized_exactly(files, fp8_models, names):
    """layer_weight = float32(fp8 weight) * scale_weight of the file, bit for bit, on either ComfyUI's layout
    (0.3.64: fp8 Parameter + scale_weight; 0.33: a comfy-kitchen QuantizedTensor)."""
    model = fp8_models["high"]
    for name in names:
        w, b = C.layer_weight(model, name)
        ref = dequantized(files["fp8_scaled", "high"], name)
        assert w.dtype == torch.float32 and torch.equal(w, ref), name
        assert b is not None and b.is_floating_point()
        sw = C.stored_layer_weight(model, name)
        assert (sw.kind, sw.dtype) == ("fp8_scaled", "float8_e4m3fn") and sw.scale.numel() == 1
    # the file really is fp8: dequantized differs from the BF16 original by fp8 rounding, no more
    bf16 = _load(files["bf16", "high"])
    w8, w16 = C.layer_weight(model, names[0])[0], C.layer_weight(bf16, names[0])[0].float()
    scale = C.stored_layer_weight(model, names[0]).scale.float()
    err = (w8 - w16).abs()
    assert 0 < float(err.max()) <= float(w16.abs().max()) / 16 + float(scale) * 2 ** -6


def test_weight_source_of_each_kind(files, fp8_models, names):
    assert C.weight_source(fp8_models["low"], names)[0] == {"kind": "fp8_scaled", "weight_dtype": "float8_e4m3fn"}
    plain = _load(files["bf16", "low"])
    dtype = C.layer_weight(plain, names[0])[0].dtype  # ComfyUI holds a BF16 file in bf16, fp16 or fp32
    assert C.weight_source(plain, names)[0] == {"kind": C.FLOAT_KINDS[dtype],
                                                "weight_dtype": str(dtype).removeprefix("torch.")}
    assert C.weight_source(fp8_models["low"], [])[0] == {}


def test_fingerprint_reads_only_the_sampled_values_and_equals_the_full_one(fp8_models, names):
    """FingerprintWeights dequantizes only the runs model_fingerprint reads; the fingerprint is the one of the
    fully dequantized weights, in both versions."""
    model = fp8_models["high"]
    full = {f"{n}.weight": C.layer_weight(model, n)[0] for n in names}
    lazy = C.FingerprintWeights(model, names)
    assert isinstance(lazy[f"{names[0]}.weight"], C.SampledWeight) and f"{names[0]}.weight" in lazy
    for version in (1, 2):
        assert fmt.model_fingerprint(lazy, names, version) == fmt.model_fingerprint(full, names, version)


# --- a whole calibration from fp8_scaled files ---------------------------------------------------

@pytest.fixture(scope="module")
def fp8_calibrated(fp8_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib_fp8")
    cfg = CalibrationConfig(**FAST, out_dir=str(out))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return calibrate(fp8_models["high"], fp8_models["low"], _items(2), cfg), cfg
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow  # the module's calibration from fp8_scaled experts
def test_calibration_from_fp8_scaled_records_the_source(fp8_calibrated, fp8_models, files, names):
    res, _ = fp8_calibrated
    for expert in ("high", "low"):
        layers, meta = fmt.load_state(getattr(res, expert))
        assert meta.source == {"kind": "fp8_scaled", "weight_dtype": "float8_e4m3fn"}
        assert meta.source_family == "fp8_scaled" and sorted(layers) == sorted(names)
        # the fingerprint is of the dequantized weights, read from the file here (not from ComfyUI)
        deq = {f"{n}.weight": dequantized(files["fp8_scaled", expert], n) for n in names}
        assert meta.fingerprint == fmt.model_fingerprint(deq, names)
        from safetensors.torch import load_file
        bf16 = load_file(str(files["bf16", expert]))
        assert meta.fingerprint != fmt.model_fingerprint(bf16, names)
        header = fmt.read_header(getattr(res, expert))
        assert json.loads(header["source"]) == meta.source
    report = json.loads(res.report.read_text())
    assert report["experts"]["high"]["fingerprint"]["source"]["kind"] == "fp8_scaled"
    for expert in ("high", "low"):
        for r in report["experts"][expert]["layers"]:  # the layers' reference was the dequantized weight
            assert r["sqnr_after_db"] > r["sqnr_rtn_db"], (expert, r["name"])


@pytest.mark.slow  # the module's calibration from fp8_scaled experts
def test_fp8_state_layers_reconstruct_the_dequantized_weight(fp8_calibrated, files):
    """The state quantized the dequantized fp8 weights: its layers are closer to them than to a weight of
    another expert, and as close as RTN W4A4 of them allows."""
    layers, _ = fmt.load_state(fp8_calibrated[0].high)
    name = "blocks.1.ffn.0"
    w = dequantized(files["fp8_scaled", "high"], name)
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0))
    ref = x @ w.T
    ours = nm.w4a4_linear(x, layers[name], 0) - layers[name].bias.float()
    other = x @ dequantized(files["fp8_scaled", "low"], name).T
    assert nm.sqnr_db(ref, ours) > 10.0 and nm.sqnr_db(ref, other) < 1.0


# --- refusals before any work --------------------------------------------------------------------

def _lora_like_patch(model, name="blocks.0.self_attn.q"):
    m = model.clone()
    n, k = C.layer_weight(model, name)[0].shape
    m.add_patches({f"diffusion_model.{name}.weight": (torch.full((n, k), 1e-3),)}, 1.0)
    return m


@pytest.mark.parametrize("source", ["bf16", "fp8_scaled"])
@pytest.mark.parametrize("patched", ["high", "low"])
def test_patched_expert_is_refused_before_any_file(files, tmp_path, source, patched):
    models = {e: _load(files[source, e]) for e in ("high", "low")}
    models[patched] = _lora_like_patch(models[patched])
    ticks = []
    with pytest.raises(CalibrationError, match=f"the {patched}-noise model carries weight patches"):
        calibrate(models["high"], models["low"], _items(), CalibrationConfig(**FAST, out_dir=str(tmp_path)),
                  progress=lambda *a: ticks.append(a))
    assert ticks == [] and list(tmp_path.iterdir()) == []


def test_fp8_without_scales_is_refused_before_any_work(files, tmp_path):
    """A BF16 file loaded with weight_dtype fp8_e4m3fn: rounded at load, it is no file's weights."""
    high = _load(files["bf16", "high"], dtype=torch.float8_e4m3fn)
    low = _load(files["bf16", "low"])
    ticks = []
    with pytest.raises(CalibrationError, match="float8_e4m3fn without scales") as info:
        calibrate(high, low, _items(), CalibrationConfig(**FAST, out_dir=str(tmp_path)),
                  progress=lambda *a: ticks.append(a))
    assert "the high-noise model" in str(info.value) and "weight_dtype 'default'" in str(info.value)
    assert ticks == [] and list(tmp_path.iterdir()) == []


def test_quantized_tensors_loaded_outside_inference_mode(files, tmp_path, names):
    """ComfyUI 0.33 (QuantizedTensor layers) cannot sample such a model under inference mode: refused before
    any work, saying how to load it. ComfyUI 0.3.64 holds plain fp8 Parameters, which sample either way."""
    import comfy.sd
    high = comfy.sd.load_diffusion_model(str(files["fp8_scaled", "high"]))
    low = _load(files["fp8_scaled", "low"])
    quantized = hasattr(C.bf16_module(high, names[0]).weight, "_qdata")
    cfg = CalibrationConfig(**FAST, out_dir=str(tmp_path))
    if not quantized:
        assert C.check_weight_source(high, C.plan_layers(high, cfg))["kind"] == "fp8_scaled"
        return
    ticks = []
    with pytest.raises(CalibrationError, match=r"the high-noise model was loaded outside torch\.inference_mode"):
        calibrate(high, low, _items(), cfg, progress=lambda *a: ticks.append(a))
    assert ticks == [] and list(tmp_path.iterdir()) == []


# --- the header field -----------------------------------------------------------------------------

def _state(tmp_path, name, **meta):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    path = tmp_path / f"{name}.safetensors"
    fmt.save_state(path, {"blocks.0.self_attn.q": nm.from_float(w)},
                   fmt.StateMeta(expert="high", bin_edges=(1000.0, 900.0), **meta))
    return path


def _rewrite(src, dst, edit):
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"])
    header["__metadata__"]["header_crc32"] = fmt._header_crc32(header["__metadata__"])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])
    return dst


def test_states_without_a_source_still_load(tmp_path):
    """Older states (and states made without calibration) have no 'source': plain BF16/FP16 weights."""
    old = _state(tmp_path, "old")
    assert "source" not in fmt.read_header(old)
    _, meta = fmt.load_state(old)
    assert meta.source == {} and meta.source_family == "bf16/fp16"
    new = _state(tmp_path, "new", source={"kind": "fp8_scaled", "weight_dtype": "float8_e4m3fn"})
    assert fmt.load_state(new)[1].source_family == "fp8_scaled"
    assert fmt.read_meta(new).source == {"kind": "fp8_scaled", "weight_dtype": "float8_e4m3fn"}


@pytest.mark.parametrize("source,words", [
    ('{"kind": "int4"}', "source kind 'int4' is not one of"),
    ('{"kind": "fp8_scaled", "scale": 2}', "unknown entries ['scale']"),
    ('{"kind": "fp8_scaled", "weight_dtype": 8}', "weight_dtype must be a dtype name"),
    ('["fp8_scaled"]', "header 'source' is a list, expected dict"),
    ("{", "header 'source' is not valid JSON"),
])
def test_bad_source_is_refused_on_load(tmp_path, source, words):
    good = _state(tmp_path, "good", source={"kind": "bf16", "weight_dtype": "bfloat16"})
    bad = _rewrite(good, tmp_path / "bad.safetensors", lambda m: m.update(source=source))
    with pytest.raises(fmt.W4A4FormatError) as info:
        fmt.load_state(bad)
    assert "bad.safetensors" in str(info.value) and words in str(info.value), str(info.value)


def test_state_meta_validates_the_source():
    with pytest.raises(ValueError, match="source kind 'fp8' is not one of"):
        fmt.StateMeta(expert="high", bin_edges=(1000.0, 900.0), source={"kind": "fp8"})
    with pytest.raises(ValueError, match="source must be a dict"):
        fmt.StateMeta(expert="high", bin_edges=(1000.0, 900.0), source="fp8_scaled")


# The command line from fp8_scaled files: test_cli.test_cli_end_to_end_and_refuses_overwrite.
