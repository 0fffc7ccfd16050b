"""The ComfyUI side of the pack: the nodes, which run inside ComfyUI.

- ``registry``: ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` that the repository root
  exports to ComfyUI. It is imported only inside a running ComfyUI.

Starting ComfyUI outside ComfyUI (tests, the demo, benchmarks, the calibration command line) is
``wan_w4a4.apps.runtime``. Nothing is imported here.
"""
