"""Bad W4A4 states give an error naming the file and the problem, and leave the loaded model unchanged."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm
from w4a4_testlib import make_state

pytestmark = pytest.mark.comfyui


def rewrite_header(src, dst, edit):
    """Copy a safetensors file with ``edit(metadata dict)`` applied to its ``__metadata__``."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])


def snapshot(model):
    dm = model.model.diffusion_model
    return (dict(model.object_patches), {k: list(v) for k, v in model.wrappers.items()},
            type(dm.blocks[0].self_attn.q).__name__, dm.blocks[1].ffn[2].weight.clone(), model.model_size())


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1] and after[2] == before[2] == "Linear"
    assert torch.equal(after[3], before[3]) and after[4] == before[4]


def _nan_header(good, name, clip):
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    layers = json.loads(meta["layers"])
    layers[name]["crc32"]["clip"] = fmt._crc32(clip)
    meta["layers"] = json.dumps(layers)
    meta["header_crc32"] = fmt._header_crc32(meta)
    return meta


def bad_files(env, tmp_name):
    """name -> (file name in models/w4a4, words the error must contain)."""
    d = env.w4a4_dir
    good = d / "tiny_high.safetensors"
    cases = {}

    # the low expert's state on the high expert
    cases["other expert"] = ("tiny_low.safetensors", ["tiny_low.safetensors", "'low' expert", "another model"])

    # made from another model (the low expert's weights) but labelled "high"
    make_state(env.unet("low"), "high", d / f"{tmp_name}_othermodel.safetensors")
    cases["other model"] = (f"{tmp_name}_othermodel.safetensors", ["othermodel", "fingerprint", "another model"])

    # unknown (newer) format version
    rewrite_header(good, d / f"{tmp_name}_v99.safetensors", lambda m: m.update(format_version="99"))
    cases["unknown version"] = (f"{tmp_name}_v99.safetensors", ["v99", "format_version 99", "update"])

    # unknown scheme version
    rewrite_header(good, d / f"{tmp_name}_scheme.safetensors", lambda m: m.update(scheme_version="7"))
    cases["unknown scheme"] = (f"{tmp_name}_scheme.safetensors", ["_scheme", "version 7"])

    # corrupt: bytes flipped inside the tensor data (the last tensor's bytes)
    data = bytearray(good.read_bytes())
    for i in range(len(data) - 40, len(data) - 8):
        data[i] ^= 0x5A
    (d / f"{tmp_name}_corrupt.safetensors").write_bytes(bytes(data))
    cases["corrupt"] = (f"{tmp_name}_corrupt.safetensors", ["_corrupt", "corrupt"])

    # truncated: a download cut in half
    (d / f"{tmp_name}_truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (f"{tmp_name}_truncated.safetensors", ["_truncated", "truncated or corrupt"])

    # a layer the model does not have (another architecture)
    model = env.unet("high")
    make_state(model, "high", d / f"{tmp_name}_layers.safetensors",
               layers=["blocks.0.self_attn.q"])
    layers, meta = fmt.load_state(d / f"{tmp_name}_layers.safetensors")
    layers["blocks.5.ffn.0"] = layers["blocks.0.self_attn.q"]
    fmt.save_state(d / f"{tmp_name}_layers.safetensors", layers, meta, overwrite=True)
    cases["other architecture"] = (f"{tmp_name}_layers.safetensors", ["_layers", "blocks.5.ffn.0", "do not exist"])

    # an 11-byte file whose header is valid JSON but not an object
    (d / f"{tmp_name}_list.safetensors").write_bytes(struct.pack("<Q", 3) + b"[1]")
    cases["non-object header"] = (f"{tmp_name}_list.safetensors", ["_list", "header is a JSON list"])

    # a pickle renamed .safetensors: never unpickled
    (d / f"{tmp_name}_pickle.safetensors").write_bytes(pickle.dumps({"qweight": [0] * 64}))
    cases["pickle"] = (f"{tmp_name}_pickle.safetensors", ["_pickle", "cannot be read as safetensors"])

    # a kind that is neither "state" nor "checkpoint"
    def unknown_kind(m):
        m["kind"] = "lora"
        m["header_crc32"] = fmt._header_crc32(m)
    rewrite_header(good, d / f"{tmp_name}_kind.safetensors", unknown_kind)
    cases["unknown kind"] = (f"{tmp_name}_kind.safetensors", ["_kind", "neither a W4A4 state nor a W4A4 checkpoint"])

    # a NaN clip table, its CRC made consistent (the value check must catch it)
    layers, meta = fmt.load_state(good)
    name = next(iter(layers))
    layers[name].clip.fill_(float("nan"))
    save_file({f"{n}.{f}": getattr(p, f) for n, p in layers.items() for f in fmt.FIELDS
               if getattr(p, f) is not None}, str(d / f"{tmp_name}_nan.safetensors"),
              metadata=_nan_header(good, name, layers[name].clip))
    cases["NaN clip table"] = (f"{tmp_name}_nan.safetensors", ["_nan", "clip has values outside (0, 1]"])

    # same names, other shapes
    w = torch.randn(512, 256) * 0.02
    meta = fmt.StateMeta(expert="high", bin_edges=(1000.0, 900.0))
    fmt.save_state(d / f"{tmp_name}_shape.safetensors", {"blocks.0.self_attn.q": nm.from_float(w)}, meta,
                   overwrite=True)
    cases["other shapes"] = (f"{tmp_name}_shape.safetensors", ["_shape", "512x256", "256x256"])
    return cases


def test_bad_states_raise_and_leave_model_unchanged(env):
    model = env.unet("high")
    before = snapshot(model)
    cases = bad_files(env, "bad")
    apply = env.node("WanW4A4ApplyState")
    for case, (name, words) in cases.items():
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            apply.apply(model, name)
        msg = str(info.value)
        for w in words:
            assert w in msg, f"{case}: {w!r} not in error {msg!r}"
        assert_unchanged(model, before)


def test_missing_and_escaping_names(env):
    apply = env.node("WanW4A4ApplyState")
    model = env.unet("high")
    for name, words in (("nope.safetensors", ["no W4A4 file named 'nope.safetensors'", "models/w4a4"]),
                        ("../diffusion_models/tiny_wan_high.safetensors", ["not a plain name"]),
                        ("/etc/passwd", ["not a plain name"])):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            apply.apply(model, name)
        assert all(w in str(info.value) for w in words), str(info.value)
    save = env.node("WanW4A4SaveCheckpoint")
    q = env.apply(model, "tiny_high.safetensors")
    for name in ("../escape", "/tmp/escape", "a/../../b", ".hidden"):
        with pytest.raises(ValueError):
            save.save(q, name, False)


def test_already_quantized_model_is_refused(env):
    q = env.apply(env.unet("high"), "tiny_high.safetensors")
    with pytest.raises(ValueError, match="already has W4A4 layers"):
        env.apply(q, "tiny_high.safetensors")
