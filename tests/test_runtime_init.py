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


def test_aimdo_log_level_follows_the_console_level_as_in_main_py():
    """main.py calls one comfy-aimdo log setter per console level once its devices are up (INFO by default)."""
    import logging

    assert runtime.aimdo_log_setter(logging.INFO) == "set_log_info"
    assert runtime.aimdo_log_setter(logging.NOTSET) == "set_log_info"
    assert runtime.aimdo_log_setter(logging.DEBUG) == "set_log_debug"
    assert runtime.aimdo_log_setter(logging.WARNING) == "set_log_warning"
    assert runtime.aimdo_log_setter(logging.ERROR) == "set_log_error"
    assert runtime.aimdo_log_setter(logging.CRITICAL) == "set_log_critical"


@pytest.mark.comfyui
def test_dynamic_vram_sets_comfy_aimdos_log_level(comfy_nodes, monkeypatch, caplog):
    """``enable_dynamic_vram`` does what main.py does after ``init_devices``: without the log setter comfy-aimdo
    hands every debug message to Python's logging (thousands per model call). Checked against main.py's text
    and with a stand-in comfy-aimdo (no GPU here)."""
    import sys

    import comfy.model_management as mm
    import comfy.model_patcher as mp
    from comfy.cli_args import args

    if not hasattr(mp, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI has no dynamic VRAM")
    from pathlib import Path

    main_py = (Path(mm.__file__).parents[1] / "main.py").read_text()
    assert "comfy_aimdo.control.set_log_info()" in main_py and "init_devices" in main_py
    calls = []

    class Control:
        def init_devices(self, devices):
            calls.append(("init_devices", list(devices)))
            return True

        def __getattr__(self, name):
            if not name.startswith("set_log_"):
                raise AttributeError(name)
            return lambda: calls.append(name)

    monkeypatch.setattr(mm, "is_nvidia", lambda: True)
    monkeypatch.setattr(mm, "get_all_torch_devices", lambda: [])
    monkeypatch.setattr(mp, "CoreModelPatcher", mp.CoreModelPatcher)
    monkeypatch.setattr(sys.modules["comfy.memory_management"], "aimdo_enabled",
                        getattr(sys.modules["comfy.memory_management"], "aimdo_enabled", False), raising=False)
    monkeypatch.setattr(args, "vram_headroom", getattr(args, "vram_headroom", 0), raising=False)
    caplog.set_level("INFO")  # a command's level (pytest's own is WARNING)
    assert runtime.enable_dynamic_vram(Control()) is True
    assert calls == [("init_devices", []), "set_log_info"]
