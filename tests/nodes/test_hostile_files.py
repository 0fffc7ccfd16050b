"""Hostile files in models/w4a4: the listing skips them (logged once, by name) instead of taking the
nodes off the server; each node's error names the file and the problem; a file is held against the
model before its data is read; stale temporary files of interrupted saves go when the folder is listed."""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wan_w4a4.kernels import format as fmt

pytestmark = pytest.mark.comfyui
# Errors are caught as ValueError: ComfyUI loads the pack as a custom node, whose W4A4FormatError is a
# class of its own module copy, not wan_w4a4.kernels.format's.

LIST_INPUTS = (("WanW4A4ApplyState", "state_name"), ("WanW4A4LoadModel", "ckpt_name"),
               ("WanW4A4InspectState", "state_high"))


def listed(env):
    return {node: set(env.node(node).INPUT_TYPES()["required"][key][0]) for node, key in LIST_INPUTS}


def raw_file(path, header: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def resave(src, dst, tensors=None, meta=None):
    """Copy a W4A4 file with its tensors and/or metadata edited; CRCs recomputed (a consistent file)."""
    with safe_open(str(src), "pt") as f:
        t, h = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    (tensors or (lambda t: None))(t)
    (meta or (lambda h: None))(h)
    quantized = json.loads(h["layers"])
    for name, entry in quantized.items():
        entry["crc32"] = {f: fmt._crc32(t[f"{name}.{f}"]) for f in fmt.FIELDS if f"{name}.{f}" in t}
    h["layers"] = json.dumps(quantized)
    if "rest" in h:
        h["rest"] = json.dumps({k: fmt._crc32(v) for k, v in t.items() if k.rpartition(".")[0] not in quantized})
    h.pop("header_crc32", None)
    h["header_crc32"] = fmt._header_crc32(h)
    save_file(t, str(dst), metadata=h)
    return dst


@pytest.fixture
def hostile_dir(env):
    d = env.w4a4_dir / "hostile"
    d.mkdir()
    yield d
    shutil.rmtree(d)


def test_listing_skips_hostile_headers_and_logs_each_once(env, hostile_dir, caplog):
    d = hostile_dir
    for name, header in (("list", b"[1]"), ("null", b"null"), ("string", b'"s"'), ("nested", b"[" * 100000 + b"]" * 100000),
                         ("object_list", b'{"__metadata__": [1]}'), ("entry_list", b'{"a": [1, 2]}')):
        raw_file(d / f"{name}.safetensors", header)
    assert (d / "list.safetensors").stat().st_size == 11  # the 11-byte file of the report
    (d / "garbage.safetensors").write_bytes(os.urandom(1000))
    (d / "pickle.safetensors").write_bytes(pickle.dumps({"w": [1.0] * 10}))
    (d / "cut.safetensors").write_bytes((env.w4a4_dir / "tiny_high.safetensors").read_bytes()[:1000])
    bad = {f"hostile/{p.name}" for p in d.iterdir()}
    with caplog.at_level(logging.WARNING):
        first = listed(env)
        second = listed(env)
    assert first == second
    for node, names in first.items():
        assert not names & bad, (node, names & bad)
    assert "tiny_high.safetensors" in first["WanW4A4ApplyState"] and "tiny_high.safetensors" in first["WanW4A4InspectState"]
    for name in bad:
        logged = [r.getMessage() for r in caplog.records if f"/{name}:" in r.getMessage()]
        assert len(logged) == 1, (name, logged)  # once, with its name, for both listings and all nodes
    # chosen anyway (an old prompt): the error names the file and the problem
    with pytest.raises(ValueError) as e:
        env.node("WanW4A4ApplyState").apply(env.unet("high"), "hostile/list.safetensors")
    assert "list.safetensors" in str(e.value) and "header is a JSON list, expected an object" in str(e.value)
    with pytest.raises(ValueError) as e:
        env.node("WanW4A4LoadModel").load("hostile/nested.safetensors")
    assert "nested.safetensors" in str(e.value) and "not valid JSON" in str(e.value)


def test_listing_does_not_block_on_a_fifo(env, hostile_dir):
    os.mkfifo(hostile_dir / "fifo.safetensors")
    result = []
    t = threading.Thread(target=lambda: result.append(listed(env)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "listing models/w4a4 hangs on a FIFO"
    assert all("hostile/fifo.safetensors" not in names for names in result[0].values())
    with pytest.raises((ValueError, FileNotFoundError), match="fifo.safetensors"):  # ComfyUI finds no such file
        env.node("WanW4A4ApplyState").apply(env.unet("high"), "hostile/fifo.safetensors")


def inflate(src, dst, layer, out_features, in_features):
    """A consistent copy of state ``src`` whose ``layer`` claims another size; its data is a sparse hole."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__")
    layers = json.loads(meta["layers"])
    layers[layer].update(out_features=out_features, in_features=in_features)
    meta["layers"] = json.dumps(layers)
    meta["header_crc32"] = fmt._header_crc32({k: v for k, v in meta.items() if k != "header_crc32"})
    shapes = fmt._expected_shapes(layers[layer], int(meta["num_bins"]))
    end = 0
    for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        name, _, field = key.rpartition(".")
        if name == layer:
            entry["shape"] = list(shapes[field][0])
        size = torch.Size(entry["shape"]).numel() * {"U8": 1, "F32": 4, "BF16": 2}[entry["dtype"]]
        entry["data_offsets"] = [end, end + size]
        end += size
    head = json.dumps({"__metadata__": meta, **header}).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + end)
    return 8 + len(head) + end


def test_oversized_claim_is_refused_before_reading_data(env, hostile_dir):
    layer = "blocks.0.self_attn.q"
    size = inflate(env.w4a4_dir / "tiny_high.safetensors", hostile_dir / "huge.safetensors", layer, 32768, 32768)
    assert size > 2**29
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        env.node("WanW4A4ApplyState").apply(env.unet("high"), "hostile/huge.safetensors")
    msg = str(e.value)
    # reading the (zero) data would have ended in a CRC error; the header alone says it cannot fit
    assert "huge.safetensors" in msg and "other shapes than the model's" in msg and "32768x32768" in msg, msg
    assert time.monotonic() - t0 < 5


def test_stale_temps_are_removed_when_the_folder_is_listed(env, hostile_dir):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    old = time.time() - 2 * 24 * 3600
    stale = [env.w4a4_dir / f".x.safetensors.w4a4-tmp-{p.pid}-0badf00d", hostile_dir / ".y.safetensors.abcd1234.tmp"]
    fresh = hostile_dir / f".z.safetensors.w4a4-tmp-{p.pid}-0badf00d"
    for f in stale + [fresh]:
        f.write_bytes(b"\0" * 4096)
    for f in stale:
        os.utime(f, (old, old))
    listed(env)
    assert not any(f.exists() for f in stale) and fresh.exists()


def test_unknown_kind_is_named_by_every_node(env, hostile_dir):
    resave(env.w4a4_dir / "tiny_high.safetensors", hostile_dir / "lora.safetensors", meta=lambda h: h.update(kind="lora"))
    resave(env.w4a4_dir / "tiny_high.safetensors", hostile_dir / "nokind.safetensors", meta=lambda h: h.pop("kind"))
    for name, words in (("lora", "header kind 'lora' is unknown"), ("nokind", "header lacks 'kind'")):
        calls = (lambda n: env.node("WanW4A4ApplyState").apply(env.unet("high"), n),
                 lambda n: env.node("WanW4A4LoadModel").load(n),
                 lambda n: env.node("WanW4A4InspectState").inspect(n, "(none)"))
        for call in calls:
            with pytest.raises(ValueError) as e:
                call(f"hostile/{name}.safetensors")
            msg = str(e.value)
            assert f"{name}.safetensors" in msg and words in msg and "neither a W4A4 state nor a W4A4 checkpoint" in msg
            assert "not a state" not in msg and "not a self-contained" not in msg, msg


@pytest.fixture(scope="module")
def saved_checkpoint(env):
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    return env.node("WanW4A4SaveCheckpoint").save(high, "hostile_ck_src", True)["result"][0]


def test_bad_non_quantized_tensors_name_file_and_tensor(env, hostile_dir, saved_checkpoint):
    def nan_head(t):
        t["head.head.weight"] = torch.full_like(t["head.head.weight"], float("nan"))

    def wrong_shape(t):
        t["head.head.weight"] = torch.zeros(3, 5, dtype=t["head.head.weight"].dtype)

    def missing(t):
        del t["head.head.weight"]

    for name, edit, words in (("nan", nan_head, ["'head.head.weight'", "non-finite"]),
                              ("shape", wrong_shape, ["head.head.weight", "ComfyUI cannot build the model"]),
                              ("missing", missing, ["'head.head.weight'", "ComfyUI cannot build the model"])):
        resave(saved_checkpoint, hostile_dir / f"{name}.safetensors", tensors=edit)
        with pytest.raises(ValueError) as e:
            env.node("WanW4A4LoadModel").load(f"hostile/{name}.safetensors")
        msg = str(e.value)
        assert f"{name}.safetensors" in msg and all(w in msg for w in words), (name, msg)


def test_inspect_errors_name_file_and_problem(env, hostile_dir, caplog):
    src = env.w4a4_dir / "tiny_high.safetensors"
    inspect = env.node("WanW4A4InspectState").inspect
    layer = "blocks.0.self_attn.q"

    resave(src, hostile_dir / "nanclip.safetensors", tensors=lambda t: t[f"{layer}.clip"].fill_(float("nan")))
    with pytest.raises(ValueError) as e:
        inspect("hostile/nanclip.safetensors", "(none)")
    assert "nanclip.safetensors" in str(e.value) and e.value.layer == layer and "clip has values outside (0, 1]" in str(e.value)

    resave(src, hostile_dir / "noclip.safetensors", tensors=lambda t: t.pop(f"{layer}.clip"))
    with pytest.raises(ValueError) as e:
        inspect("hostile/noclip.safetensors", "(none)")
    assert "noclip.safetensors" in str(e.value) and f"tensor {layer}.clip is missing" in str(e.value)

    save_file({"x": torch.zeros(2)}, str(hostile_dir / "plain.safetensors"))
    with pytest.raises(ValueError) as e:
        inspect("tiny_high.safetensors", "hostile/plain.safetensors")
    assert "plain.safetensors" in str(e.value) and "does not look like a W4A4 file" in str(e.value)

    # a malformed calibration report beside the state: the heatmap without SQNR, and a warning naming it
    report = {"experts": {"high": {"layers": [1, 2]}}}
    (hostile_dir / "r.report.json").write_text(json.dumps(report))
    resave(src, hostile_dir / "rep.safetensors", meta=lambda h: h.update(report=json.dumps({"path": "r.report.json"})))
    with caplog.at_level(logging.WARNING):
        text = inspect("hostile/rep.safetensors", "(none)")["result"][1]
    assert "SQNR" not in text and "r.report.json" in caplog.text and "unreadable" in caplog.text
