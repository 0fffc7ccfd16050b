"""runtime.unpack_shared_comfyui / unpacked_trees: the demo and the CLI find a ComfyUI tree on a machine
that has only ../shared/comfyui's tarballs, unpacked the way .ci/run does (so each reuses the other's)."""
from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from wan_w4a4.apps import runtime


def _tarball(path, top="ComfyUI-x", extra=()):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((f"{top}/comfy/sd.py", b"# sd\n"), (f"{top}/main.py", b"# main\n"), *extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_newest_tarball_is_unpacked_once_with_ci_stamp(tmp_path, monkeypatch):
    shared, root = tmp_path / "shared", tmp_path / "unpacked"
    shared.mkdir()
    _tarball(shared / "comfyui-0.3.64.tar.gz", "ComfyUI")
    newest = _tarball(shared / "comfyui-0.33.0.tar.gz", "ComfyUI-0.33.0")
    tree = runtime.unpack_shared_comfyui(shared, root)
    assert tree == root / "0.33.0" / "ComfyUI-0.33.0" and runtime.is_comfyui_tree(tree)
    assert (root / "0.33.0" / ".unpacked").read_text().strip() == hashlib.sha256(newest.read_bytes()).hexdigest()
    assert not list(root.glob("*.tmp-*"))  # renamed into place
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("unpacked twice"))
    assert runtime.unpack_shared_comfyui(shared, root) == tree
    assert runtime.unpacked_trees(root) == [tree]


def test_unpacked_trees_newest_first_and_only_stamped(tmp_path):
    for version in ("0.3.64", "0.33.0", "0.9.1"):
        (tmp_path / version / "ComfyUI" / "comfy").mkdir(parents=True)
        (tmp_path / version / "ComfyUI" / "comfy" / "sd.py").write_text("")
        (tmp_path / version / ".unpacked").write_text("x\n")
    (tmp_path / "0.50.0" / "ComfyUI" / "comfy").mkdir(parents=True)  # no stamp: half unpacked, not used
    (tmp_path / "0.50.0" / "ComfyUI" / "comfy" / "sd.py").write_text("")
    assert [p.parent.name for p in runtime.unpacked_trees(tmp_path)] == ["0.33.0", "0.9.1", "0.3.64"]


def test_no_tarball_no_tree(tmp_path):
    assert runtime.unpack_shared_comfyui(tmp_path, tmp_path / "unpacked") is None


def test_a_member_outside_the_folder_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    _tarball(shared / "comfyui-1.0.0.tar.gz", extra=(("../escaped.py", b"x"),))
    with pytest.raises(tarfile.TarError):
        runtime.unpack_shared_comfyui(shared, tmp_path / "unpacked")
    assert not (tmp_path / "escaped.py").exists()
