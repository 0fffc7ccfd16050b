"""The pack's programs, outside ComfyUI: they start ComfyUI in-process and use everything else.

- ``runtime``: finds a ComfyUI source tree and starts it in this process (tests, the demo, benchmarks,
  the calibration command line), and loads this repository into it as a custom node.
- ``stand_ins``: import-time stand-ins for torchvision and torchaudio where no build matching the
  installed torch is installed (ComfyUI imports both; Wan uses neither).
- ``calibrate``: ``python -m wan_w4a4 calibrate``, W4A4 states for the two Wan2.2 experts.
- ``demo``: ``python -m wan_w4a4 demo``, calibrate, quantize and sample the mini model.
- ``serve``: ``python -m wan_w4a4 serve -- MAIN_PY_ARGS``, ComfyUI's own ``main.py`` with this pack loaded.
- ``mini_train``, ``mini_sample``, ``mini_pictures``: train the mini model (``minimodel/``), sample it
  through ComfyUI's nodes, draw its pictures.

Imports go one way: kernels <- calibration <- minimodel <- nodes <- apps (tests/test_layers.py
checks it). Nothing is imported here, so that ``import wan_w4a4.apps.runtime`` never drags in
``comfy`` or ``torch``.
"""
