"""The example workflows' start picture (nodes/example_inputs.py): shipped in example_workflows/input/,
named by the workflows' Load Image nodes, and copied into ComfyUI's input folder when the pack loads,
only where no file of that name is, never raising. (tests/nodes/test_server.py checks a fresh server:
its Load Image list holds the picture and the workflows queue without an image error.)"""
from __future__ import annotations

import errno
import json
import logging
import os
import types

import pytest
from wan_w4a4.apps.runtime import REPO_ROOT
from wan_w4a4.nodes import example_inputs as ei

WORKFLOWS = REPO_ROOT / "example_workflows"
Image = pytest.importorskip("PIL.Image")


def load_image_names(path) -> list[str]:
    return [n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "LoadImage"]


def test_shipped_inputs_are_small_pictures_that_decode():
    shipped = ei.shipped_inputs()
    assert shipped and all(p.parent == WORKFLOWS / "input" for p in shipped)
    for p in shipped:
        assert p.name.startswith("wan_w4a4_"), p.name  # never the name of a user's or an official template's file
        assert 10_000 < p.stat().st_size < 100_000, (p.name, p.stat().st_size)
        with Image.open(p) as img:
            assert img.format in ("JPEG", "PNG") and img.mode == "RGB", (p.name, img.format, img.mode)
            img.load()  # decodes: a truncated file fails here
            assert img.size == (640, 640), (p.name, img.size)  # the workflows' video size


def test_the_workflows_load_exactly_the_shipped_inputs():
    per_workflow = {p.name: load_image_names(p) for p in sorted(WORKFLOWS.glob("*.json"))}
    for name in ("wan22_i2v_14b_w4a4.json", "wan22_i2v_w4a4_calibrate.json"):
        assert per_workflow[name] == ["wan_w4a4_start_640.jpg"], (name, per_workflow[name])
    used = {n for names in per_workflow.values() for n in names}
    assert used == {p.name for p in ei.shipped_inputs()}  # nothing missing, nothing shipped for nothing


@pytest.fixture
def sources(tmp_path):
    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"picture a")
    (folder / "b.png").write_bytes(b"picture b")
    (folder / ".hidden.jpg").write_bytes(b"not shipped")
    return ei.shipped_inputs(folder)


def test_shipped_inputs_leave_hidden_files_out(sources):
    assert [p.name for p in sources] == ["a.jpg", "b.png"]


def test_install_copies_what_is_absent(tmp_path, sources):
    input_dir = tmp_path / "comfy" / "input"  # not there yet: a fresh base directory
    assert ei.install_inputs(sources, str(input_dir)) == ["a.jpg", "b.png"]
    assert sorted(os.listdir(input_dir)) == ["a.jpg", "b.png"]  # no temporary file left
    assert [(input_dir / p.name).read_bytes() for p in sources] == [b"picture a", b"picture b"]
    assert ei.install_inputs(sources, str(input_dir)) == []  # the next start: nothing to do


def test_install_never_replaces_what_is_there(tmp_path, sources):
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    (input_dir / "a.jpg").write_bytes(b"the user's own a")
    (input_dir / "b.png").symlink_to(tmp_path / "gone.png")  # a dangling link is still the user's name
    assert ei.install_inputs(sources, str(input_dir)) == []
    assert (input_dir / "a.jpg").read_bytes() == b"the user's own a"
    assert os.readlink(input_dir / "b.png") == str(tmp_path / "gone.png")


def test_install_keeps_a_file_published_meanwhile(tmp_path, sources, monkeypatch):
    """Another ComfyUI writes the name between the check and the copy: its file stays."""
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    write_bytes = ei.fmt.write_bytes

    def racing(path, data, overwrite=False):
        if path.endswith("a.jpg"):
            (input_dir / "a.jpg").write_bytes(b"the other process's a")
        write_bytes(path, data, overwrite=overwrite)

    monkeypatch.setattr(ei.fmt, "write_bytes", racing)
    assert ei.install_inputs(sources, str(input_dir)) == ["b.png"]
    assert (input_dir / "a.jpg").read_bytes() == b"the other process's a"
    assert sorted(os.listdir(input_dir)) == ["a.jpg", "b.png"]


def test_install_survives_an_input_folder_it_cannot_create(tmp_path, sources, caplog):
    blocker = tmp_path / "input"
    blocker.write_bytes(b"a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger=ei.log.name):
        assert ei.install_inputs(sources, str(blocker / "sub")) == []
    assert f"cannot create ComfyUI's input folder {blocker / 'sub'}" in caplog.text


def test_install_survives_an_unwritable_input_folder(tmp_path, sources, caplog, monkeypatch):
    """Each file that cannot be written is a warning naming it; the others are still copied. Where the
    process may write anyway (root ignores the mode), the refusal comes from the writer instead."""
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    if os.geteuid() == 0:
        def refuse(path, data, overwrite=False):
            if path.endswith("a.jpg"):
                raise PermissionError(errno.EACCES, "Permission denied", path)
            (input_dir / os.path.basename(path)).write_bytes(data)
        monkeypatch.setattr(ei.fmt, "write_bytes", refuse)
        expected = ["b.png"]
    else:
        input_dir.chmod(0o555)
        expected = []
    try:
        with caplog.at_level(logging.WARNING, logger=ei.log.name):
            assert ei.install_inputs(sources, str(input_dir)) == expected
    finally:
        input_dir.chmod(0o755)
    assert f"cannot copy the example workflows' input a.jpg into {input_dir} (Permission denied)" in caplog.text
    assert sorted(os.listdir(input_dir)) == expected


@pytest.mark.parametrize("folder_paths, why", [
    (types.SimpleNamespace(), "has no get_input_directory"),
    (types.SimpleNamespace(get_input_directory=lambda: 1 / 0), "could not copy the example workflows' inputs"),
])
def test_install_example_inputs_never_raises(folder_paths, why, caplog):
    with caplog.at_level(logging.WARNING, logger=ei.log.name):
        assert ei.install_example_inputs(folder_paths) == []
    assert why in caplog.text


@pytest.mark.comfyui
def test_loading_the_pack_puts_the_inputs_where_load_image_lists_them(env):
    """The pack, loaded by ComfyUI into a fresh base directory, copied its pictures into the input
    folder, where Load Image (whose list the frontend checks a workflow's file against) finds them."""
    import folder_paths

    input_dir = folder_paths.get_input_directory()
    assert os.path.samefile(input_dir, env.models_dir.parent / "input")  # the session's fresh base directory
    listed = env.nodes.NODE_CLASS_MAPPINGS["LoadImage"].INPUT_TYPES()["required"]["image"][0]
    for p in ei.shipped_inputs():
        assert p.name in listed, (p.name, listed)
        with open(os.path.join(input_dir, p.name), "rb") as f:
            assert f.read() == p.read_bytes(), p.name
