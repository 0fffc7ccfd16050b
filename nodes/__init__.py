"""The ComfyUI side of the pack.

- ``registry``: ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` that the repository root
  exports to ComfyUI. It is imported only inside a running ComfyUI.
- ``runtime``: bootstraps a ComfyUI source tree outside ComfyUI (tests, the demo, benchmarks and the
  calibration command line), and loads this repository into it as a custom node.
- ``stand_ins``: import-time stand-ins for torchvision and torchaudio where no build matching the
  installed torch is installed (ComfyUI imports both; Wan uses neither).

Nothing is imported here, so that ``import wan_w4a4.nodes.runtime`` never drags in ``comfy``.
"""
