"""ComfyUI-WanW4A4: Wan2.2 image-to-video with 4-bit weights and 4-bit activations.

One code base, three entry points:
- ComfyUI imports this folder as a custom-node package and reads ``NODE_CLASS_MAPPINGS``;
- tests and the command line import the same files as the package ``wan_w4a4``
  (``pip install -e .`` maps the repository root to that name);
- ``python -m wan_w4a4 ...`` runs the command line (``__main__.py``).

``kernels`` and ``calibration`` import without ComfyUI and without Triton. The node layer is
imported only inside a running ComfyUI (``comfy`` already loaded), so that importing the math
never drags in ComfyUI's device initialisation.
"""
import sys

__version__ = "0.1.0"

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = None

if "comfy.model_management" in sys.modules:  # we are being loaded by ComfyUI
    from .nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
