"""runtime.init_comfyui once ComfyUI is initialised in the process: later calls keep that tree."""
from __future__ import annotations

import pytest

from wan_w4a4.apps import runtime


@pytest.mark.comfyui
def test_a_later_call_without_a_path_keeps_the_initialised_tree(comfy_nodes, monkeypatch, tmp_path):
    """``demo --comfyui X`` initialises ComfyUI from X; the mini model's helpers then call
    ``init_comfyui()`` without a path. That must answer with X's nodes, not look for (or unpack) the
    default tree and refuse to switch to it. Naming another tree is still refused."""
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))  # the default search would find nothing here
    monkeypatch.setattr(runtime, "_shared_tree", lambda: None)
    assert runtime.init_comfyui() is comfy_nodes
    other = tmp_path / "other"
    (other / "comfy").mkdir(parents=True)
    (other / "comfy" / "sd.py").write_text("# sd\n")
    (other / "main.py").write_text("# main\n")
    with pytest.raises(RuntimeError, match="already initialised"):
        runtime.init_comfyui(other)
