"""``runtime.finish``: a command that ran ComfyUI under dynamic VRAM ends with its own status once its
output is flushed, before the interpreter's teardown (where comfy-aimdo's buffers killed the process by
a signal after the work was written); without dynamic VRAM it only returns the status."""
from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys, types
sys.modules["comfy.memory_management"] = types.SimpleNamespace(aimdo_enabled={aimdo})
from wan_w4a4.apps import runtime
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
print("written", end="")  # no newline: only a flush gets it out
logging.getLogger("t").info("logged")
rc = runtime.finish(3)
print(" returned", rc)
"""


@pytest.mark.parametrize("aimdo", [True, False])
def test_finish_ends_the_process_only_under_dynamic_vram(aimdo):
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(aimdo=aimdo)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert "written" in p.stdout and "logged" in p.stdout, p.stdout + p.stderr
    if aimdo:
        assert p.returncode == 3 and "returned" not in p.stdout, p.stdout + p.stderr
    else:
        assert p.returncode == 0 and "returned 3" in p.stdout, p.stdout + p.stderr
