"""The on-disk format (kernels/format.py): bit-exact round trips, and every broken file gives a
W4A4FormatError that names the file, the layer (where there is one) and the problem."""
import dataclasses
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm

Q = "blocks.0.self_attn.q"
K_ = "blocks.0.self_attn.k"
FFN2 = "blocks.0.ffn.2"
HEAD = "blocks.1.cross_attn.o"


def make_layers(num_bins=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    clip = torch.tensor([1.0, 0.8, 0.6][:num_bins])
    shared_l1 = torch.randn(256, 8, generator=g).to(torch.bfloat16)  # q and k share L1, as in SVDQuant
    return {
        Q: nm.from_float(torch.randn(128, 256, generator=g), torch.randn(128, generator=g),
                         smooth=torch.rand(256, generator=g) + 0.5, lr_down=shared_l1,
                         lr_up=torch.randn(8, 128, generator=g).to(torch.bfloat16), clip=clip, num_bins=num_bins),
        K_: nm.from_float(torch.randn(128, 256, generator=g), None, lr_down=shared_l1,
                          lr_up=torch.randn(8, 128, generator=g).to(torch.bfloat16), clip=clip, num_bins=num_bins),
        FFN2: nm.from_float(torch.randn(64, 384, generator=g), torch.randn(64, generator=g), clip=clip,
                            num_bins=num_bins, act_unsigned=True),  # rank 0, unsigned
        HEAD: nm.from_float(torch.randn(96, 128, generator=g), None, clip=clip, num_bins=num_bins),
    }


def make_meta(num_bins=3, **kw):
    edges = [1000.0, 966.5, 933.0, 900.0][:num_bins + 1]
    return fmt.StateMeta(expert="high", bin_edges=edges, fingerprint="0123456789abcdef",
                         report={"path": "high.report.json"}, **kw)


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "high.safetensors"
    layers = make_layers()
    fmt.save_state(path, layers, make_meta())
    return path, layers


def assert_same_layers(a, b):
    assert list(a) == list(b)
    for name in a:
        for field in fmt.FIELDS:
            x, y = getattr(a[name], field), getattr(b[name], field)
            if x is None:
                assert y is None, (name, field)
            else:
                assert y.dtype == x.dtype and torch.equal(x, y), (name, field)
        assert (a[name].act_unsigned, a[name].act_shift) == (b[name].act_unsigned, b[name].act_shift)


def assert_format_error(excinfo, path, layer, *fragments):
    e = excinfo.value
    msg = str(e)
    assert str(path) in msg, msg
    assert e.layer == layer, msg
    if layer is not None:
        assert repr(layer) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    assert e.hint, msg


def read_raw(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite(path, tensors=None, header=None, drop=(), set_header=None):
    """Re-save a file with raw safetensors (bypassing our validation), mutated."""
    t, h = read_raw(path)
    t.update(tensors or {})
    for k in drop:
        del t[k]
    h.update(set_header or {})
    if header is not None:
        h = header
    os.unlink(path)
    save_file(t, str(path), metadata=h)


def tensor_byte_offset(path, key):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    return 8 + n + hdr[key]["data_offsets"][0]


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

def test_fields_are_the_tensors_of_w4a4params():
    # format.FIELDS is the one table of a layer's tensors (nodes/ops.py takes it too): every
    # W4A4Params field but the two activation flags, in the dataclass's order.
    names = tuple(f.name for f in dataclasses.fields(nm.W4A4Params))
    assert fmt.FIELDS == tuple(n for n in names if n not in ("act_unsigned", "act_shift"))


def test_state_round_trip_is_bit_exact(state):
    path, layers = state
    loaded, meta = fmt.load_state(path)
    assert_same_layers(layers, loaded)
    assert meta == make_meta()
    assert meta.num_bins == 3 and meta.scheme == nm.SCHEME and meta.scheme_version == nm.SCHEME_VERSION
    assert fmt.read_meta(path) == meta
    assert loaded[FFN2].act_shift == nm.GELU_SHIFT and loaded[FFN2].rank == 0
    assert loaded[K_].bias is None
    x = torch.randn(4, 256)
    assert torch.equal(nm.w4a4_linear(x, loaded[Q], 2), nm.w4a4_linear(x, layers[Q], 2))


def test_header_is_readable_and_complete(state):
    path, _ = state
    _, h = read_raw(path)
    assert h["format"] == "wan-w4a4" and h["format_version"] == "1" and h["kind"] == "state"
    assert (h["scheme"], h["scheme_version"], h["bits"], h["group_size"]) == ("i8g64", "1", "4", "64")
    assert json.loads(h["bin_edges"]) == [1000.0, 966.5, 933.0, 900.0] and h["num_bins"] == "3"
    layers = json.loads(h["layers"])
    assert list(layers) == [Q, K_, FFN2, HEAD]
    assert layers[Q]["rank"] == 8 and layers[FFN2]["rank"] == 0
    assert layers[FFN2]["act_unsigned"] is True and layers[FFN2]["act_shift"] == nm.GELU_SHIFT
    assert layers[K_]["bias"] is False


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "expert.safetensors"
    layers = make_layers()
    rest = {"head.head.weight": torch.randn(16, 128).to(torch.bfloat16), "blocks.0.norm3.weight": torch.randn(128),
            "blocks.0.self_attn.norm_q.weight": torch.randn(128).to(torch.bfloat16)}
    fmt.save_checkpoint(path, layers, rest, make_meta())
    loaded, rest2, meta = fmt.load_checkpoint(path)
    assert_same_layers(layers, loaded)
    assert rest2.keys() == rest.keys() and all(torch.equal(rest[k], rest2[k]) for k in rest)
    assert meta == make_meta()
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, None, "'checkpoint'", "load_checkpoint")
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_checkpoint(make_state_file(tmp_path))
    assert "load_state" in str(e.value)


def make_state_file(tmp_path, name="s.safetensors"):
    path = tmp_path / name
    fmt.save_state(path, make_layers(), make_meta())
    return path


def test_checkpoint_refuses_float_weights_of_quantized_layers(tmp_path):
    path = tmp_path / "expert.safetensors"
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.save_checkpoint(path, make_layers(), {f"{Q}.weight": torch.randn(128, 256)}, make_meta())
    assert_format_error(e, path, Q, "belongs to a quantized layer")
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# Writing: validation first, atomic, no overwrite by accident
# ---------------------------------------------------------------------------------------------

def test_overwrite_refusal(state):
    path, layers = state
    before = path.read_bytes()
    with pytest.raises(FileExistsError) as e:
        fmt.save_state(path, make_layers(seed=1), make_meta())
    assert str(path) in str(e.value) and "overwrite=True" in str(e.value)
    assert path.read_bytes() == before
    fmt.save_state(path, make_layers(seed=1), make_meta(), overwrite=True)
    assert_same_layers(fmt.load_state(path)[0], make_layers(seed=1))


def test_non_safetensors_paths_are_refused(tmp_path):
    for name in ("state.pt", "state.ckpt", "state.bin", "state"):
        path = tmp_path / name
        with pytest.raises(fmt.W4A4FormatError) as e:
            fmt.save_state(path, make_layers(), make_meta())
        assert_format_error(e, path, None, "not a .safetensors file")
        assert not path.exists()
        path.write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
        with pytest.raises(fmt.W4A4FormatError) as e:
            fmt.load_state(path)
        assert_format_error(e, path, None, "not a .safetensors file")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        fmt.load_state(path)
    assert str(path) in str(e.value)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    path = tmp_path / "high.safetensors"
    with pytest.raises(OSError, match="No space"):
        fmt.save_state(path, make_layers(), make_meta())
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary


def test_failed_overwrite_keeps_the_old_file(state, monkeypatch):
    import safetensors.torch

    path, layers = state
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # even an interrupt cleans up

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        fmt.save_state(path, make_layers(seed=2), make_meta(), overwrite=True)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def _invalid_layers():
    """(description, layer to break, mutation of its W4A4Params, expected fragment)."""
    def set_(field, value):
        def mutate(p):
            setattr(p, field, value(p))
        return mutate
    return [
        ("qweight int8", Q, set_("qweight", lambda p: p.qweight.to(torch.int8)), "qweight has dtype I8"),
        ("K not tiled", HEAD, set_("qweight", lambda p: p.qweight[:, :32].contiguous()), "multiple of 128"),
        ("lr_up rank", Q, set_("lr_up", lambda p: p.lr_up[:4].contiguous()), "lr_up has shape (4, 128)"),
        ("clip bins", FFN2, set_("clip", lambda p: p.clip[:2].contiguous()), "clip has shape (2,)"),
        ("clip > 1", FFN2, set_("clip", lambda p: torch.tensor([1.0, 1.5, 0.5])), "outside (0, 1]"),
        ("clip 0", FFN2, set_("clip", lambda p: torch.tensor([1.0, 0.0, 0.5])), "outside (0, 1]"),
        ("factor 0", K_, set_("wfactor", lambda p: torch.zeros_like(p.wfactor)), "outside 1..16"),
        ("factor 17", K_, set_("wfactor", lambda p: torch.full_like(p.wfactor, 17)), "outside 1..16"),
        ("smooth <= 0", Q, set_("smooth", lambda p: -p.smooth), "smooth has values"),
        ("wscale nan", Q, set_("wscale", lambda p: p.wscale * float("nan")), "wscale has values"),
        ("bias fp16", Q, set_("bias", lambda p: p.bias.half()), "bias has dtype F16"),
        ("bias [N+1]", Q, set_("bias", lambda p: torch.zeros(129)), "bias has shape (129,)"),
        ("lr_down fp32", Q, set_("lr_down", lambda p: p.lr_down.float()), "lr_down has dtype F32"),
        ("unsigned flag", FFN2, set_("act_unsigned", lambda p: 1), "act_unsigned"),
        ("shift nan", FFN2, set_("act_shift", lambda p: float("nan")), "act_shift"),
    ]


@pytest.mark.parametrize("case", _invalid_layers(), ids=lambda c: c[0])
def test_save_validates_before_writing(tmp_path, case):
    _, layer, mutate, fragment = case
    layers = make_layers()
    mutate(layers[layer])
    path = tmp_path / "bad.safetensors"
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.save_state(path, layers, make_meta())
    assert str(path) in str(e.value) and e.value.layer == layer and fragment in str(e.value), str(e.value)
    assert os.listdir(tmp_path) == []


def test_save_refuses_empty_and_bad_meta(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(fmt.W4A4FormatError, match="no layers"):
        fmt.save_state(path, {}, make_meta())
    with pytest.raises(TypeError):
        fmt.save_state(path, make_layers(), {"expert": "high"})


@pytest.mark.parametrize("policy,clip,ok", [
    ("none", [1.0, 1.0, 1.0], True), ("none", [1.0, 0.9, 1.0], False),
    ("per-expert", [0.8, 0.8, 0.8], True), ("global", [0.8, 0.7, 0.8], False), ("per-bin", [1.0, 0.7, 0.5], True)])
def test_clip_policy_is_checked_against_the_clips(tmp_path, policy, clip, ok):
    layers = make_layers()
    for p in layers.values():
        p.clip = torch.tensor(clip)
    path = tmp_path / "x.safetensors"
    if ok:
        fmt.save_state(path, layers, make_meta(clip_policy=policy))
        assert fmt.load_state(path)[1].clip_policy == policy
    else:
        with pytest.raises(fmt.W4A4FormatError, match="clip_policy"):
            fmt.save_state(path, layers, make_meta(clip_policy=policy))


# ---------------------------------------------------------------------------------------------
# Reading broken files
# ---------------------------------------------------------------------------------------------

def test_truncated_file(state):
    path, _ = state
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, None, "cannot be read as safetensors", "truncated or corrupt")


@pytest.mark.parametrize("offset", [0, 3, 8, 9])
def test_corrupted_header_bytes(state, offset):
    path, _ = state
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A  # the header length, its opening brace, its first key
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, None, "cannot be read as safetensors")


def test_corrupted_header_value_is_caught_by_header_crc(state):
    # A flipped character inside a free-form value still parses; header_crc32 catches it.
    path, _ = state
    data = bytearray(path.read_bytes())
    data[data.index(b"0123456789abcdef") + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, None, "header is corrupt")
    assert fmt.load_state(path, verify=False)[1].fingerprint != "0123456789abcdef"


def test_edited_header_is_refused(state):
    path, _ = state
    rewrite(path, set_header={"expert": "low"})  # e.g. relabelling a high-noise state by hand
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, None, "header_crc32 mismatch")


@pytest.mark.parametrize("layer,field", [(Q, "qweight"), (FFN2, "wscale"), (K_, "lr_up"), (HEAD, "clip")])
def test_corrupted_tensor_bytes_are_caught_by_crc(state, layer, field):
    path, _ = state
    data = bytearray(path.read_bytes())
    data[tensor_byte_offset(path, f"{layer}.{field}") + 1] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, layer, f"{layer}.{field} is corrupt", "CRC32")


def test_value_checks_catch_corruption_without_crc(state):
    path, _ = state
    data = bytearray(path.read_bytes())
    data[tensor_byte_offset(path, f"{K_}.wfactor")] = 0  # factor 0: not a valid grid
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path, verify=False)
    assert_format_error(e, path, K_, "wfactor has values outside 1..16")


@pytest.mark.parametrize("key,value,fragment", [
    (f"{Q}.lr_up", torch.zeros(9, 128, dtype=torch.bfloat16), "lr_up has shape (9, 128), expected (8, 128)"),
    (f"{Q}.qweight", torch.zeros(128, 64, dtype=torch.uint8), "qweight has shape (128, 64), expected (128, 128)"),
    (f"{FFN2}.clip", torch.ones(2), "clip has shape (2,), expected (3,)"),
    (f"{HEAD}.wfactor", torch.ones(96, 3, dtype=torch.uint8), "wfactor has shape (96, 3), expected (96, 2)"),
])
def test_wrong_shape(state, key, value, fragment):
    path, _ = state
    rewrite(path, {key: value})
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, key.rsplit(".", 1)[0], fragment)


@pytest.mark.parametrize("key,dtype,fragment", [
    (f"{Q}.wscale", torch.float16, "wscale has dtype F16, expected F32"),
    (f"{Q}.qweight", torch.int8, "qweight has dtype I8, expected U8"),
    (f"{K_}.lr_down", torch.float32, "lr_down has dtype F32, expected BF16"),
    (f"{FFN2}.bias", torch.bfloat16, "bias has dtype BF16, expected F32"),
])
def test_wrong_dtype(state, key, dtype, fragment):
    path, _ = state
    t, _ = read_raw(path)
    rewrite(path, {key: t[key].to(dtype)})
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, key.rsplit(".", 1)[0], fragment)


@pytest.mark.parametrize("key", [f"{Q}.smooth", f"{K_}.lr_down", f"{FFN2}.bias", f"{HEAD}.clip"])
def test_missing_tensor(state, key):
    path, _ = state
    rewrite(path, drop=[key])
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, key.rsplit(".", 1)[0], f"tensor {key} is missing")


@pytest.mark.parametrize("key,layer,fragment", [
    (f"{K_}.bias", K_, f"unexpected tensor(s) {K_}.bias"),  # header says: no bias
    (f"{Q}.weight", Q, f"unexpected tensor '{Q}.weight'"),  # the float weight next to the W4A4 tensors
    ("head.head.weight", None, "unexpected tensor 'head.head.weight'"),
])
def test_extra_tensor(state, key, layer, fragment):
    path, _ = state
    rewrite(path, {key: torch.zeros(128)})
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, layer, fragment)


@pytest.mark.parametrize("changes,fragment,hint", [
    ({"format_version": "2"}, "format_version 2 is newer than this pack reads (1)", "update"),
    ({"format_version": "0"}, "format_version 0 is invalid", "re-create"),
    ({"format_version": "one"}, "'format_version' = 'one' is not an integer", "re-create"),
    ({"format": "gguf"}, "header has format 'gguf'", "plain model checkpoint"),
    ({"scheme": "nvfp4"}, "scheme 'nvfp4' is not supported", "newer"),
    ({"scheme_version": "2"}, "scheme i8g64 version 2 is newer", "update"),
    ({"bits": "8"}, "bits = 8", "update"),
    ({"group_size": "128"}, "group_size = 128", "update"),
    ({"num_bins": "2"}, "num_bins = 2 but bin_edges has 4 edges", "re-create"),
    ({"bin_edges": "[900, 1000]"}, "strictly descending", "re-create"),
    ({"bin_edges": "[1000, "}, "'bin_edges' is not valid JSON", "re-create"),
    ({"clip_policy": "magic"}, "clip_policy 'magic'", "re-create"),
    ({"expert": ""}, "expert must be a non-empty string", "re-create"),
    ({"layers": "{}"}, "header lists no layers", "re-create"),
    ({"report": "[]"}, "'report' is a list, expected dict", "re-create"),
    ({"handover": "[10]"}, "'handover' is a list, expected dict", "re-create"),
    ({"handover": "{"}, "'handover' is not valid JSON", "re-create"),
])
def test_bad_header(state, changes, fragment, hint):
    path, _ = state
    rewrite(path, set_header=changes)
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, None, fragment, hint)


def test_file_without_our_header(tmp_path):
    path = tmp_path / "wan2.2_i2v_high_noise_14B_fp16.safetensors"  # a model, not a W4A4 state
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, None, "header has format None", "plain model checkpoint")


@pytest.mark.parametrize("field,value,fragment", [
    ("rank", 4, "lr_down has shape (256, 8), expected (256, 4)"),
    ("in_features", 200, "in_features = 200 is not a multiple of 128"),
    ("out_features", 0, "out_features = 0 is not a valid count"),
    ("act_unsigned", "yes", "act_unsigned = 'yes' is not a boolean"),
    ("bias", False, f"unexpected tensor(s) {Q}.bias"),
])
def test_header_layer_entry_disagrees(state, field, value, fragment):
    path, _ = state
    _, h = read_raw(path)
    layers = json.loads(h["layers"])
    layers[Q][field] = value
    rewrite(path, set_header={"layers": json.dumps(layers)})
    with pytest.raises(fmt.W4A4FormatError) as e:
        fmt.load_state(path)
    assert_format_error(e, path, Q, fragment)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,fragment", [
    ({"bin_edges": [1000]}, "B+1 >= 2"),
    ({"bin_edges": [900, 1000]}, "strictly descending"),
    ({"bin_edges": [1000, 1000, 900]}, "strictly descending"),
    ({"bin_edges": [1000, float("nan")]}, "finite"),
    ({"bin_edges": [1000, -1]}, ">= 0"),
    ({"bin_edges": "abc"}, "sequence of numbers"),
    ({"expert": ""}, "non-empty"),
    ({"clip_policy": "best"}, "clip_policy"),
    ({"report": {"x": object()}}, "JSON"),
    ({"report": "r.json"}, "dict"),
    ({"handover": [10]}, "handover must be a dict"),
    ({"scheme": "nvfp4"}, "not supported"),
    ({"scheme_version": 2}, "newer ComfyUI-WanW4A4"),
])
def test_state_meta_validates_on_construction(kw, fragment):
    args = {"expert": "low", "bin_edges": [900, 450, 0], **kw}
    with pytest.raises(ValueError, match=fragment.replace("+", r"\+")):
        fmt.StateMeta(**args)


HANDOVER = {"by": "step", "boundary": 846.354, "high_steps": 10, "steps": 20, "shift": 5.0, "sampler": "euler",
            "scheduler": "simple"}


def test_handover_round_trips_and_older_files_still_load(tmp_path):
    """The optional ``handover`` header entry: kept through states and checkpoints; a file without it
    (everything written before it existed) loads with {} and its header is unchanged."""
    meta = make_meta(handover=HANDOVER)
    fmt.save_state(tmp_path / "s.safetensors", make_layers(), meta)
    assert fmt.load_state(tmp_path / "s.safetensors")[1] == meta and fmt.read_meta(tmp_path / "s.safetensors") == meta
    assert json.loads(read_raw(tmp_path / "s.safetensors")[1]["handover"]) == HANDOVER
    assert read_raw(tmp_path / "s.safetensors")[1]["format_version"] == "1"
    fmt.save_checkpoint(tmp_path / "c.safetensors", make_layers(), {"head.head.weight": torch.zeros(4, 4)}, meta)
    assert fmt.load_checkpoint(tmp_path / "c.safetensors")[2].handover == HANDOVER
    old = make_state_file(tmp_path, "old.safetensors")
    assert "handover" not in read_raw(old)[1] and fmt.read_meta(old).handover == {}


def test_handover_text():
    assert fmt.handover_text({}) == ""
    assert fmt.handover_text(HANDOVER) == "hand-over at step 10 of 20 (bins split at t = 846.4), shift 5, euler/simple"
    by_t = {**HANDOVER, "by": "boundary", "boundary": 900.0, "high_steps": 10, "shift": 8.0}
    assert fmt.handover_text(by_t) == "expert switch at t = 900 (step 10 of 20), shift 8, euler/simple"
    assert fmt.handover_text({"by": "step"}) == '{"by": "step"}'  # free-form JSON from a file: shown, never raises


def test_bin_index_follows_the_documented_intervals():
    meta = fmt.StateMeta(expert="high", bin_edges=[1000, 950, 900])
    # bin i: edges[i+1] <= t < edges[i]; closed at the low end like the expert switch (t >= 900 -> high).
    # An independent oracle on purpose: the expected bins are written out by hand, not computed by
    # numerics.bin_of (the one definition of the rule).
    cases = {1000.0: 0, 999.0: 0, 950.0: 0, 949.99: 1, 900.0: 1, 1200.0: 0, 899.0: 1, 0.0: 1}
    assert {t: meta.bin_index(t) for t in cases} == cases
    assert fmt.StateMeta(expert="low", bin_edges=[900, 0]).bin_index(450) == 0


# ---------------------------------------------------------------------------------------------
# Source-model fingerprint
# ---------------------------------------------------------------------------------------------

def fake_model(seed, n_blocks=2, dim=256, ffn=640):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in range(n_blocks):
        for name in ("self_attn.q", "self_attn.k", "cross_attn.o"):
            sd[f"blocks.{b}.{name}.weight"] = torch.randn(dim, dim, generator=g).to(torch.bfloat16)
            sd[f"blocks.{b}.{name}.bias"] = torch.randn(dim, generator=g).to(torch.bfloat16)
        sd[f"blocks.{b}.ffn.0.weight"] = torch.randn(ffn, dim, generator=g).to(torch.bfloat16)
        sd[f"blocks.{b}.ffn.2.weight"] = torch.randn(dim, ffn, generator=g).to(torch.bfloat16)
    return sd


def layer_names(sd):
    return [k[: -len(".weight")] for k in sd if k.endswith(".weight")]


def test_fingerprint_is_stable_and_short():
    sd = fake_model(0)
    fp = fmt.model_fingerprint(sd, layer_names(sd))
    assert fp.startswith("v2-") and len(fp) == 19 and int(fp[3:], 16) >= 0 and fmt.fingerprint_version(fp) == 2
    assert fmt.model_fingerprint(fake_model(0), reversed(layer_names(sd))) == fp  # order-free
    assert fmt.model_fingerprint({k: v.float() for k, v in sd.items()}, layer_names(sd)) == fp  # fp32 copy


def test_fingerprint_matches_an_fp16_copy():
    """ComfyUI holds Wan in fp16 where the GPU prefers it: the fp16 copy of BF16 weights must match (found
    on the H200 with --disable-dynamic-vram: tiny values, below fp16's normal range, round). Version 1
    does not always; a state with a version-1 fingerprint is compared in version 1."""
    sd = fake_model(0)
    sd["blocks.0.self_attn.q.weight"][0, :64] = torch.logspace(-12, -3, 64).to(torch.bfloat16)  # fp16 subnormals
    half = {k: v.to(torch.float16) for k, v in sd.items()}
    names = layer_names(sd)
    assert fmt.model_fingerprint(half, names) == fmt.model_fingerprint(sd, names)
    assert fmt.model_fingerprint(half, names, version=1) != fmt.model_fingerprint(sd, names, version=1)
    old = fmt.model_fingerprint(sd, names, version=1)
    assert fmt.fingerprint_version(old) == 1 and fmt.model_fingerprint_like(old, sd, names) == old


PINNED_V2 = "v2-2dea1c6439067487"  # today's states


def test_fingerprint_is_pinned():
    # Fixed across versions: a change in model_fingerprint orphans every state file made before it.
    def ramp(n, k, offset):  # exact integers in bf16: no platform-dependent rounding
        return ((torch.arange(n * k) * 7 + offset) % 251 - 125).reshape(n, k).to(torch.bfloat16)
    sd = {"blocks.0.self_attn.q.weight": ramp(256, 256, 0), "blocks.0.ffn.2.weight": ramp(256, 640, 3),
          "blocks.0.ffn.0.weight": ramp(4, 8, 5)}  # smaller than the sample: hashed whole
    names = ["blocks.0.self_attn.q", "blocks.0.ffn.2", "blocks.0.ffn.0"]
    assert fmt.model_fingerprint(sd, names, version=1) == "acaec21395dbfd8a"  # states made before v2
    assert fmt.model_fingerprint(sd, names) == PINNED_V2


def test_fingerprint_tells_models_apart():
    high, low = fake_model(0), fake_model(1)  # two experts: same names and shapes, other values
    names = layer_names(high)
    fp = fmt.model_fingerprint(high, names)
    assert fmt.model_fingerprint(low, names) != fp
    assert fmt.model_fingerprint(high, names[:-1]) != fp
    wider = fake_model(0, dim=384)
    assert fmt.model_fingerprint(wider, layer_names(wider)) != fp
    edited = dict(high)  # one value changed in one layer, inside the sampled runs
    w = edited[f"{names[0]}.weight"].clone()
    w.view(-1)[0] += 1
    edited[f"{names[0]}.weight"] = w
    assert fmt.model_fingerprint(edited, names) != fp


def test_fingerprint_names_a_missing_layer():
    with pytest.raises(KeyError, match="blocks.9.ffn.0.weight"):
        fmt.model_fingerprint(fake_model(0), ["blocks.9.ffn.0"])
