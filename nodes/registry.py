"""Node mappings that ComfyUI reads from the pack (classic ``NODE_CLASS_MAPPINGS`` API), and the
example workflows' input files put into ComfyUI's input folder (``example_inputs``).

Imported by the repository root's ``__init__.py`` only when ``comfy`` is already loaded, so node
modules imported from here may ``import comfy`` at module level.
"""
import folder_paths

from . import (
    calibrate_node,
    calibration_set_node,
    example_inputs,
    mini_nodes,
    w4a4_nodes,
)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _module in (w4a4_nodes, calibrate_node, calibration_set_node, mini_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

# Before the frontend asks for /object_info, whose Load Image list is the input folder's files: the
# example workflows then open without a missing input. Copies only what is absent; never raises.
example_inputs.install_example_inputs(folder_paths)
