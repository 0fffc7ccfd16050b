"""Hostile W4A4 files and concurrent use of one folder (kernels/format.py).

Every malformed file is refused with a W4A4FormatError naming the file, from its header alone where
the header is what is wrong; two processes saving one name never both succeed; a load racing a
replace of the file always reads one whole file; temporary files of interrupted saves have a name
that says what they are and are removed once stale.
"""
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm

from test_format import Q, assert_same_layers, make_layers, make_meta, read_raw


def raw_file(path, header, data=b""):
    """A safetensors file from a raw header (any JSON value, or bytes) and data bytes."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def tensor_entry(dtype, shape, begin):
    n = torch.Size(shape).numel() * {"U8": 1, "F32": 4}[dtype]
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + n]}


def corpus(tmp_path, good):
    """name -> (path, words the error must contain). All of them must be refused by every reader."""
    d = tmp_path
    cases = {}
    for name, header in (("list", [1]), ("null", None), ("string", "s"), ("number", 7)):
        cases[f"header is a JSON {name}"] = (raw_file(d / f"{name}.safetensors", header),
                                             ["expected an object"])
    cases["deeply nested lists"] = (raw_file(d / "nested.safetensors", b"[" * 200000 + b"]" * 200000),
                                    ["not valid JSON"])
    cases["garbage"] = (d / "garbage.safetensors", ["cannot be read as safetensors"])
    cases["garbage"][0].write_bytes(os.urandom(4096))
    cases["empty"] = (d / "empty.safetensors", ["0 bytes long"])
    cases["empty"][0].write_bytes(b"")
    cases["huge header claim"] = (d / "huge.safetensors", ["header claims 1099511627776 bytes"])
    cases["huge header claim"][0].write_bytes(struct.pack("<Q", 2**40) + b"{}" + b" " * 30)
    cases["pickle renamed"] = (d / "pickle.safetensors", ["cannot be read as safetensors"])
    cases["pickle renamed"][0].write_bytes(pickle.dumps({"qweight": list(range(100))}))
    cases["not UTF-8"] = (raw_file(d / "latin.safetensors", b'{"\xff": 1}'), ["not valid JSON"])
    cases["metadata not strings"] = (raw_file(d / "meta.safetensors", {"__metadata__": {"format": 1}}),
                                     ["__metadata__ is not an object of strings"])
    cases["unknown dtype"] = (raw_file(d / "dtype.safetensors", {"a": {"dtype": "Q4", "shape": [2],
                                                                        "data_offsets": [0, 1]}}, b"\0"),
                              ["'a'", "unknown dtype 'Q4'"])
    cases["negative shape"] = (raw_file(d / "shape.safetensors", {"a": {"dtype": "U8", "shape": [-1],
                                                                         "data_offsets": [0, 1]}}, b"\0"),
                               ["'a'", "invalid shape"])
    cases["offsets do not match the shape"] = (
        raw_file(d / "span.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
        ["'a'", "span 4 bytes", "needs 16"])
    cases["overlapping tensors"] = (
        raw_file(d / "overlap.safetensors", {"a": tensor_entry("U8", [8], 0), "b": tensor_entry("U8", [8], 4)},
                 b"\0" * 12), ["'b'", "overlap or leave a gap"])
    cases["data beyond the end (a sparse claim)"] = (
        raw_file(d / "claim.safetensors", {"a": tensor_entry("U8", [2**31], 0)}, b"\0" * 64),
        ["declares 2147483648 bytes of tensor data, the file holds 64"])
    cases["bytes appended"] = (d / "appended.safetensors", ["declares", "the file holds"])
    cases["bytes appended"][0].write_bytes(good.read_bytes() + b"\0" * 3 * 2**20)
    cases["truncated"] = (d / "cut.safetensors", ["truncated or corrupt"])
    cases["truncated"][0].write_bytes(good.read_bytes()[:-100])
    t, h = read_raw(good)
    for label, edit in (("kind unknown", {"kind": "lora"}), ("kind missing", None)):
        meta = dict(h, **(edit or {}))
        if edit is None:
            del meta["kind"]
        meta["header_crc32"] = fmt._header_crc32(meta)
        path = d / f"{label.replace(' ', '_')}.safetensors"
        save_file(t, str(path), metadata=meta)
        cases[label] = (path, ["neither a W4A4 state nor a W4A4 checkpoint"])
    os.mkfifo(d / "fifo.safetensors")
    cases["FIFO"] = (d / "fifo.safetensors", ["not a regular file"])
    os.mkdir(d / "folder.safetensors")
    cases["folder"] = (d / "folder.safetensors", ["not a regular file"])
    os.symlink("loop.safetensors", d / "loop.safetensors")
    cases["symlink loop"] = (d / "loop.safetensors", ["cannot be opened"])
    return cases


@pytest.fixture
def hostile(tmp_path):
    good = tmp_path / "good.safetensors"
    fmt.save_state(good, make_layers(), make_meta())
    return corpus(tmp_path, good)


@pytest.mark.parametrize("reader", ["load_state", "load_checkpoint", "read_meta", "read_layout", "read_clips",
                                    "read_header"])
def test_hostile_files_are_refused_naming_file_and_problem(hostile, reader):
    for case, (path, words) in hostile.items():
        if reader == "read_header" and case.startswith("kind"):
            continue  # a sound safetensors header: read_header does not judge the W4A4 fields
        t0 = time.monotonic()
        with pytest.raises(fmt.W4A4FormatError) as e:
            getattr(fmt, reader)(path)
        msg = str(e.value)
        assert str(path) in msg, (case, msg)
        for w in words:
            assert w in msg, (case, w, msg)
        assert e.value.hint, (case, msg)
        assert time.monotonic() - t0 < 1.0, (case, "refusing a file must not read it")


def checkpoint(tmp_path, rest, name="ck.safetensors"):
    path = tmp_path / name
    fmt.save_checkpoint(path, make_layers(), rest, make_meta())
    return path


def test_checkpoint_with_non_finite_rest_tensor_is_refused(tmp_path):
    for value in (float("nan"), float("inf")):
        w = torch.ones(16, 8)
        w[3, 2] = value
        path = checkpoint(tmp_path, {"head.head.weight": w.to(torch.bfloat16), "blocks.0.norm3.weight": torch.ones(8)},
                          f"ck_{value}.safetensors")
        with pytest.raises(fmt.W4A4FormatError) as e:
            fmt.load_checkpoint(path)
        assert str(path) in str(e.value) and "'head.head.weight'" in str(e.value) and "non-finite" in str(e.value)
    fp8 = torch.ones(16, 8, dtype=torch.float8_e4m3fn)  # torch.isfinite has no fp8 kernel: checked as float
    fp8.view(torch.uint8)[3, 2] = 0x7F  # NaN in e4m3fn
    path = checkpoint(tmp_path, {"head.head.bias": fp8}, "ck_fp8.safetensors")
    with pytest.raises(fmt.W4A4FormatError, match="non-finite"):
        fmt.load_checkpoint(path)
    ints = checkpoint(tmp_path, {"pos.index": torch.arange(4)}, "ints.safetensors")  # no NaN in integers
    assert torch.equal(fmt.load_checkpoint(ints)[1]["pos.index"], torch.arange(4))


def test_undeclared_checkpoint_tensor_is_refused_from_the_header(tmp_path):
    path = checkpoint(tmp_path, {"head.head.weight": torch.ones(16, 8)})
    t, h = read_raw(path)
    t["extra.weight"] = torch.zeros(2**20, dtype=torch.uint8)  # not in the header's "rest"
    os.unlink(path)
    save_file(t, str(path), metadata=h)
    for reader in (fmt.read_layout, fmt.load_checkpoint):
        with pytest.raises(fmt.W4A4FormatError) as e:
            reader(path, "checkpoint") if reader is fmt.read_layout else reader(path)
        assert str(path) in str(e.value) and "undeclared ['extra.weight']" in str(e.value)


def test_read_layout_reads_sizes_from_the_header(tmp_path):
    path = tmp_path / "s.safetensors"
    fmt.save_state(path, make_layers(), make_meta())
    meta, shapes = fmt.read_layout(path)
    assert meta == make_meta()
    assert shapes[Q] == fmt.LayerShape(out_features=128, in_features=256, rank=8)
    t, h = read_raw(path)
    layers = json.loads(h["layers"])
    layers[Q]["rank"] = 300  # wider than the layer: no low-rank branch is
    h["layers"] = json.dumps(layers)
    h["header_crc32"] = fmt._header_crc32(h)
    t[f"{Q}.lr_down"] = torch.zeros(256, 300, dtype=torch.bfloat16)
    t[f"{Q}.lr_up"] = torch.zeros(300, 128, dtype=torch.bfloat16)
    os.unlink(path)
    save_file(t, str(path), metadata=h)
    for reader in (fmt.read_layout, fmt.load_state):  # one rule for the header pre-check and the load
        with pytest.raises(fmt.W4A4FormatError) as e:
            reader(path)
        assert e.value.layer == Q and "rank = 300 exceeds" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Writing: temporary files, a full disk
# ---------------------------------------------------------------------------------------------

def test_full_disk_message_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    seen = []

    class SafetensorError(Exception):  # what safetensors raises: not an OSError
        pass

    def failing_save(tensors, filename, metadata=None):
        seen.append(os.path.basename(filename))
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    path = tmp_path / "high.safetensors"
    with pytest.raises(OSError) as e:
        fmt.save_state(path, make_layers(), make_meta())
    assert str(path) in str(e.value) and "No space left" in str(e.value)
    assert os.listdir(tmp_path) == []
    m = fmt.TEMP_RE.match(seen[0])  # the temp file said what it was while it existed
    assert seen[0].startswith(".high.safetensors.w4a4-tmp-") and m and int(m.group(1)) == os.getpid()


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_rule():
    now, day = 1e9, 24 * 3600
    alive = {111: True, 222: False, 333: None}.get
    name = ".s.safetensors.w4a4-tmp-{}-0a1b2c3d"
    assert fmt.is_stale_temp(name.format(222), now - day - 1, now, alive)       # old, writer gone
    assert fmt.is_stale_temp(name.format(333), now - day - 1, now, alive)       # old, cannot tell
    assert not fmt.is_stale_temp(name.format(111), now - 3 * day, now, alive)  # writer still running
    assert not fmt.is_stale_temp(name.format(222), now - day + 60, now, alive)  # not a day old
    assert fmt.is_stale_temp(".s.safetensors.ab_12cde.tmp", now - day - 1, now, alive)  # older versions' name
    for other in (".s.safetensors", "s.safetensors.w4a4-tmp-222-0a", ".notes", ".s.safetensors.tmp"):
        assert not fmt.is_stale_temp(other, now - 9 * day, now, alive), other


def test_stale_temps_are_removed_when_the_folder_is_written(tmp_path):
    old = time.time() - 2 * 24 * 3600
    dead = dead_pid()
    files = {f".a.safetensors.w4a4-tmp-{dead}-00ff": False, ".b.safetensors.x1y2z3_4.tmp": False,  # stale
             f".c.safetensors.w4a4-tmp-{os.getpid()}-00ff": True,  # a live writer: kept
             ".notes": True, "kept.safetensors": True}
    for name in files:
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (old, old))
    fresh = tmp_path / f".d.safetensors.w4a4-tmp-{dead}-00ff"  # a save that may still be under way elsewhere
    fresh.write_bytes(b"x")
    fmt.save_state(tmp_path / "new.safetensors", make_layers(), make_meta())
    left = set(os.listdir(tmp_path))
    assert left == {n for n, keep in files.items() if keep} | {fresh.name, "new.safetensors"}


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------

SAVER = textwrap.dedent('''
    import os, sys, time
    import torch
    from wan_w4a4.kernels import format as fmt
    from wan_w4a4.kernels import numerics as nm

    folder, role, other, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    g = torch.Generator().manual_seed(int(role == "b"))
    layers = {"blocks.0.self_attn.q": nm.from_float(torch.randn(64, 128, generator=g), None, num_bins=1,
                                                    clip=torch.tensor([1.0]))}
    meta = fmt.StateMeta(expert="high", bin_edges=(1000.0, 900.0))
    current = [0]

    def barrier(tag):
        open(os.path.join(folder, f"{tag}-{role}"), "w").close()
        deadline = time.time() + 5
        while not os.path.exists(os.path.join(folder, f"{tag}-{other}")) and time.time() < deadline:
            pass

    def publishing(fn):  # both writers publish their finished file at the same moment
        def wrapped(*args, **kw):
            barrier(f"ready{current[0]}")
            return fn(*args, **kw)
        return wrapped

    os.replace, os.link = publishing(os.replace), publishing(os.link)
    barrier("start")
    for i in range(n):
        current[0] = i
        try:
            fmt.save_state(os.path.join(folder, f"s{i}.safetensors"), layers, meta)
            print(i, "saved", flush=True)
        except FileExistsError as e:
            assert f"s{i}.safetensors" in str(e), e
            print(i, "exists", flush=True)
''')


@pytest.mark.slow  # two Python processes importing torch: about 6 s on two cores
def test_two_processes_saving_one_name_never_both_succeed(tmp_path):
    n = 20
    procs = {role: subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), role, other, str(n)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role, other in (("a", "b"), ("b", "a"))}
    results = {}
    for role, p in procs.items():
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results[role] = dict(line.split() for line in out.splitlines())
    for i in range(n):
        outcomes = sorted(results[r][str(i)] for r in "ab")
        assert outcomes == ["exists", "saved"], (i, outcomes)
        winner = "a" if results["a"][str(i)] == "saved" else "b"
        g = torch.Generator().manual_seed(int(winner == "b"))
        want = nm.from_float(torch.randn(64, 128, generator=g), None, num_bins=1, clip=torch.tensor([1.0]))
        got = fmt.load_state(tmp_path / f"s{i}.safetensors")[0]["blocks.0.self_attn.q"]
        assert torch.equal(got.qweight, want.qweight), f"s{i}: the file is not the one its saver reported"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left


REPLACER = textwrap.dedent('''
    import os, shutil, sys, time
    a, b, target, until = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    i = 0
    while time.time() < until:  # complete files only, each published with one os.replace
        tmp = target + ".next"
        shutil.copyfile((a, b)[i % 2], tmp)
        os.replace(tmp, target)
        i += 1
    print(i)
''')


@pytest.mark.slow  # a writer process (importing torch) races the loads for 2.5 s
def test_loads_racing_a_replace_read_one_whole_file(tmp_path):
    a, b, target = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "s.safetensors"
    la, lb = make_layers(seed=1), make_layers(seed=2)
    fmt.save_state(a, la, make_meta())
    fmt.save_state(b, lb, make_meta())
    fmt.save_state(target, la, make_meta())
    until = time.time() + 2.5
    writer = subprocess.Popen([sys.executable, "-c", REPLACER, str(a), str(b), str(target), str(until)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loads, failures = 0, []
    try:
        while time.time() < until:
            try:
                layers, _ = fmt.load_state(target)
            except fmt.W4A4FormatError as e:
                failures.append(str(e))
                continue
            loads += 1
            first = layers[Q].qweight
            assert_same_layers(la if torch.equal(first, la[Q].qweight) else lb, layers)  # never a mix
    finally:
        out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    assert int(out) > 20 and loads > 20, (out, loads)
    assert not failures, f"{len(failures)} of {loads + len(failures)} loads failed, e.g. {failures[0]}"


def _rewrite_in_place_on_first_data_read(monkeypatch, path, then_replace_with=None):
    """While the first tensor is read, flip its bytes in the file being read (a writer rewriting in place)
    and, if given, replace the path with another file (the writer's os.replace)."""
    real = fmt._File._read_exact
    done = []

    def spy(self, offset, n, out=None):
        if not done and offset >= getattr(self, "data_start", 1 << 62):
            done.append(offset)
            with open(path, "r+b") as f:  # the same inode the reader holds open
                f.seek(offset)
                chunk = f.read(n)
                f.seek(offset)
                f.write(bytes(b ^ 0xFF for b in chunk))
            if then_replace_with is not None:
                os.replace(then_replace_with, path)
        return real(self, offset, n, out)

    monkeypatch.setattr(fmt._File, "_read_exact", spy)
    return done


def test_crc_mismatch_on_a_replaced_file_reads_the_new_file(tmp_path, monkeypatch):
    """A file rewritten in place and then replaced while being read: the CRC check catches the mixed
    bytes, the path now names another file, and the one re-read returns that file whole."""
    target, new = tmp_path / "s.safetensors", tmp_path / "new.safetensors"
    fmt.save_state(target, make_layers(seed=1), make_meta())
    lb = make_layers(seed=2)
    fmt.save_state(new, lb, make_meta())
    done = _rewrite_in_place_on_first_data_read(monkeypatch, target, then_replace_with=new)
    layers, _ = fmt.load_state(target)
    assert done and not new.exists()
    assert_same_layers(lb, layers)


def test_crc_mismatch_in_an_unreplaced_file_is_an_error(tmp_path, monkeypatch):
    """The same corruption without a replace is no race: no second read, an error naming the tensor."""
    target = tmp_path / "s.safetensors"
    fmt.save_state(target, make_layers(seed=1), make_meta())
    done = _rewrite_in_place_on_first_data_read(monkeypatch, target)
    with pytest.raises(fmt.W4A4CorruptTensorError, match="CRC32 mismatch") as info:
        fmt.load_state(target)
    assert done and str(target) in str(info.value)
