"""runtime.comfyui_nodes once a command initialised ComfyUI in the process: helpers keep that tree."""
from __future__ import annotations

import pytest

from wan_w4a4.apps import runtime


@pytest.mark.comfyui
def test_helpers_keep_the_tree_a_command_initialised(comfy_nodes, monkeypatch, tmp_path):
    """``demo --comfyui X`` initialises ComfyUI from X; the mini model's helpers (``mini_sample``) then
    need ComfyUI's nodes. They must get X's, not look for (or unpack) the default tree and refuse to
    switch to it. Naming another tree is still refused."""
    from wan_w4a4.apps import mini_sample

    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))  # the default search would find nothing here
    monkeypatch.setattr(runtime, "_shared_tree", lambda: None)
    assert runtime.comfyui_nodes() is comfy_nodes
    assert mini_sample._nodes() is comfy_nodes
    other = tmp_path / "other"
    (other / "comfy").mkdir(parents=True)
    (other / "comfy" / "sd.py").write_text("# sd\n")
    (other / "main.py").write_text("# main\n")
    with pytest.raises(RuntimeError, match="already initialised"):
        runtime.init_comfyui(other)


def test_a_cpu_script_without_comfyui_says_why_and_stops(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        assert runtime.start_cpu_script("mini_x", tmp_path / "nowhere", 1) is False
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err.startswith("mini_x: ComfyUI not found") and "nowhere" in err
