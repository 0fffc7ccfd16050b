"""The mini model: a tiny Wan2.2-I2V testbed that runs on a CPU (architecture, synthetic data, text
encoder, conditioning) and its two trained experts, shipped in this folder.

It imports only ``kernels`` and ``calibration`` (and ComfyUI's own modules, inside the functions that
need a running ComfyUI). The programs that use it (the demo, training, sampling, pictures) are in
``wan_w4a4.apps``.
"""
from pathlib import Path

# The trained experts shipped beside this file (README, tests and example workflows name them).
EMBEDDED_DIR = Path(__file__).resolve().parent
EMBEDDED_FILES = {"high": "high_noise.safetensors", "low": "low_noise.safetensors"}
